"""The CLI as a user meets it: subprocesses, exit codes, messages on stderr, no tracebacks."""

import json
import textwrap

import pytest

from tests.helpers import mlflow_runs, run_cli


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_summary_json_prints_every_layer_and_totals(workdir):
    result = run_cli(["task=summary", "model=resnet_lite", "summary.format=json"], workdir)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total_params"] == 174874
    assert data["layers"][0] == {"name": "conv2d_0", "type": "conv2d", "depth": 0, "output_shape": [16, 28, 28],
                                 "params": 144, "flops": 225792}
    assert [row["name"] for row in data["layers"]][-3:] == ["global_avgpool_9", "dense_10", "softmax_11"]


def test_summary_table(workdir):
    result = run_cli(["task=summary", "model=classic_cnn"], workdir)
    assert result.returncode == 0, result.stderr
    assert "dense_5" in result.stdout and "3,274,634" in result.stdout


def test_validate_task(workdir):
    result = run_cli(["task=validate", "model.layers.0.filters=8"], workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: classic_cnn")


def test_user_model_from_config_dir_in_any_working_directory(tmp_path):
    configs = tmp_path / "my_configs" / "model"
    configs.mkdir(parents=True)
    (configs / "my_net.yaml").write_text(textwrap.dedent("""\
        name: my_net
        layers:
          - {type: conv2d, filters: 8, kernel: 3, padding: same, activation: relu}
          - {type: global_avgpool}
          - {type: dense, units: "${dataset.num_classes}"}
          - {type: softmax}
    """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(["--config-dir", str(tmp_path / "my_configs"), "model=my_net", "task=summary",
                      "summary.format=json"], elsewhere)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "my_net"


def test_bad_user_model_names_its_file_and_key(tmp_path):
    configs = tmp_path / "my_configs" / "model"
    configs.mkdir(parents=True)
    (configs / "bad.yaml").write_text("name: bad\nlayers:\n  - {type: conv2d, filters: 8, kernel: 3, padding: smae}\n")
    result = run_cli(["--config-dir", str(tmp_path / "my_configs"), "model=bad", "task=validate"], tmp_path)
    assert_user_error(result, "my_configs/model/bad.yaml has", "model.layers[0].padding", "did you mean 'same'")


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["framework.name=pytorch"], ["framework.name: unknown framework 'pytorch'", "did you mean 'torch'"]),
        (["device.name=gpu"], ["device.name", "expected 'cpu', 'cuda', 'cuda:N' or 'auto'"]),
        (["trainer.epochs=abc"], ["trainer.epochs: expected an integer; received 'abc'"]),
        (["trainer.batch_size=0"], ["trainer.batch_size"]),
        (["optimizer.lr=-1"], ["optimizer.lr"]),
        (["model.layers.0.type=conv"], ["model.layers[0].type: unknown layer type 'conv'"]),
        (["model.layers.1.size=100"], ["model.layers[1]: (maxpool) output would be"]),
        (["model.layers.6.units=12"], ["the model outputs 12 values but the dataset has 10 classes"]),
        (["+model.layers.0.filter=3"], ["unknown key 'filter' (did you mean 'filters'?)"]),
        (["framework.jit=true"], [], ),
    ],
)
def test_bad_overrides_are_user_errors(workdir, overrides, fragments):
    result = run_cli(overrides + ["task=validate"], workdir)
    if not fragments:  # Hydra itself refuses keys the config does not have
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "framework.jit" in result.stderr
        return
    assert_user_error(result, *fragments)


def test_unknown_group_option_lists_the_choices(workdir):
    result = run_cli(["framework=jax"], workdir)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "torch" in result.stderr and "chainer" in result.stderr


def test_cuda_without_gpu_is_refused_before_any_run(workdir, tracking_uri):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli(["device=cuda", f"tracking.uri={tracking_uri}"], workdir)
    assert_user_error(result, "device=cuda", "no usable CUDA GPU")
    _, runs = mlflow_runs(tracking_uri)
    assert runs == []


def test_unreachable_tracking_server_stops_before_training(workdir):
    result = run_cli(["tracking.uri=http://127.0.0.1:9", "trainer.epochs=1"], workdir,
                     env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert_user_error(result, "tracking.uri=http://127.0.0.1:9 cannot be used")
    assert "epoch" not in result.stderr.lower().split("cannot be used")[0]


def test_cfg_job_prints_resolved_config(workdir):
    result = run_cli(["--cfg", "job", "model.layers.0.filters=64"], workdir)
    assert result.returncode == 0
    assert "filters: 64" in result.stdout


def test_yaml_syntax_error_in_user_model_names_file_and_line(tmp_path):
    configs = tmp_path / "my_configs" / "model"
    configs.mkdir(parents=True)
    (configs / "broken.yaml").write_text("name: broken\nlayers:\n  - {type: dense, units: ${dataset.num_classes}}\n")
    result = run_cli(["--config-dir", str(tmp_path / "my_configs"), "model=broken", "task=validate"], tmp_path)
    assert_user_error(result, "YAML syntax error in", "broken.yaml, line 3", "quote interpolations")


def test_problems_from_several_groups_are_reported_together(workdir):
    result = run_cli(["task=validate", "trainer.epochs=abc", "optimizer.lr=-1", "model.layers.0.padding=smae"], workdir)
    assert_user_error(result, "the config has 3 problems", "[command line: trainer.epochs=abc]",
                      "optimizer.lr", "model.layers[0].padding")


def test_unknown_key_names_the_group_its_keys_and_the_close_match_in_one_line(workdir):
    result = run_cli(["task=validate", "trainer.epoch=3"], workdir)
    assert_user_error(result, "trainer.epoch=3: trainer has no key 'epoch' (did you mean 'epochs'?)",
                      "its keys: epochs, batch_size")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "full_key" not in result.stderr and "object_type" not in result.stderr


def test_added_key_lists_its_own_groups_keys_not_the_roots(workdir):
    result = run_cli(["task=validate", "+trainer.epoch=3"], workdir)
    assert_user_error(result, "trainer.epoch: unknown key 'epoch' (did you mean 'epochs'?)", "allowed keys: epochs")
    assert "task, model" not in result.stderr


@pytest.mark.parametrize("override,choices", [("model=nope", "'classic_cnn' or 'resnet_lite'"),
                                              ("hydra/launcher=nope", "'ray_local', 'submitit_local' or 'submitit_slurm'")])
def test_unknown_group_choice_is_one_line_without_the_search_path(workdir, override, choices):
    result = run_cli(["task=validate", override], workdir)
    assert_user_error(result, f"cnnrun: {override}: config group", choices)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "search path" not in result.stderr


def test_help_is_cnnruns_own(workdir):
    result = run_cli(["--help"], workdir)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("cnnrun: train a CNN"), text[:300]
    assert "powered by Hydra" not in text
    sections = [text.index(s) for s in ("== Tasks", "task=eval checkpoint=", "== Examples", "== Config groups",
                                        "model: classic_cnn, resnet_lite", "--multirun")]
    assert sections == sorted(sections), text
    assert "--version : Show cnnrun's version" in text


def test_version_is_cnnruns_with_its_stack(workdir):
    import cnnrun

    result = run_cli(["--version"], workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"cnnrun {cnnrun.__version__}"
    assert "hydra-core 1." in result.stdout and "pydantic " in result.stdout and "torch" in result.stdout
    assert not result.stdout.startswith("Hydra")


def test_version_lists_every_backends_framework():
    from cnnrun.backends import BACKENDS
    from cnnrun.version import FRAMEWORK_PACKAGES

    assert list(FRAMEWORK_PACKAGES) == [info.package for info in BACKENDS.values()]


@pytest.mark.parametrize("how", ["override", "config file"])
def test_a_multirun_mode_set_in_the_config_is_still_honoured(tmp_path, how):
    """Hydra composes the config only once; a hydra.mode from an override or a user's file still counts."""
    args = ["task=summary", "summary.format=json"]
    if how == "override":
        args.append("hydra.mode=MULTIRUN")
    else:
        (tmp_path / "my_configs" / "runmode").mkdir(parents=True)
        sweep_mode = "# @package _global_\nhydra:\n  mode: MULTIRUN\n"
        (tmp_path / "my_configs" / "runmode" / "sweep.yaml").write_text(sweep_mode)
        args = ["--config-dir", str(tmp_path / "my_configs"), "+runmode=sweep", *args]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "multirun").is_dir() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_progress_in_a_log_file_is_plain_lines_and_never_blank(workdir):
    """stderr to a pipe (a CI log, a batch job's file): periodic progress lines and epoch lines, no empty lines."""
    from tests.tiny import TINY

    result = run_cli([*TINY, "trainer.progress=true", "trainer.log_every=1", "tracking.enabled=false"], workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [n for n, line in enumerate(lines) if not line.strip()] == [], result.stderr
    assert any(line.startswith("epoch 1/1  step 1/") for line in lines), result.stderr
    assert any(line.startswith("epoch 1/1  train loss ") for line in lines), result.stderr

def test_nesterov_without_momentum_is_a_config_problem_reported_with_the_others(workdir):
    result = run_cli(["task=validate", "optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true",
                      "trainer.epochs=abc"], workdir)
    assert_user_error(result, "the config has 2 problems", "trainer.epochs",
                      "optimizer.nesterov: nesterov=true needs optimizer.momentum > 0 (received momentum=0.0)")


def test_an_objective_no_run_logs_is_a_config_problem_with_the_close_name(workdir):
    result = run_cli(["task=validate", "sweep.objective=best_val_acc"], workdir)
    assert_user_error(result, "sweep.objective: a train run logs no metric 'best_val_acc' "
                              "(did you mean 'kept_val_acc'?); available: 'train_loss'")
