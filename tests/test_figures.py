"""The shared heatmap annotation of the analysis figures: each cell's number is written in the colour that reads on
that cell (black on bright cells, white on dark ones) whatever the colour map."""

import numpy as np
import pytest

from relcirc_jax.analysis import context


@pytest.mark.parametrize(
    "cmap, values, expected",
    [
        ("viridis", [[0.0, 1.0]], ["white", "black"]),  # dark purple, bright yellow (synopsis, QK screen)
        ("RdBu_r", [[-1.0, 0.0, 1.0]], ["white", "black", "white"]),  # dark blue, white, dark red (patching, ablation)
        ("viridis", [[np.nan, 0.0]], ["black", "white"]),  # a NaN cell is drawn blank
    ],
)
def test_cell_numbers_take_the_colour_that_reads_on_their_cell(cmap, values, expected):
    plt = context.pyplot()
    values = np.asarray(values)
    figure, ax = plt.subplots()
    finite = np.abs(values[np.isfinite(values)]).max()
    image = ax.imshow(values, cmap=cmap, vmin=-finite if cmap == "RdBu_r" else 0.0, vmax=finite)
    context.annotate_cells(ax, image, values, "+.2f")
    assert [text.get_color() for text in ax.texts] == expected
    assert [text.get_text() for text in ax.texts] == [format(value, "+.2f") for value in values.ravel()]
    assert [text.get_position() for text in ax.texts] == [(column, 0) for column in range(values.shape[1])]
    plt.close(figure)
