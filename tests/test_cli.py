"""``fxsparse bench`` on a tiny saved model on CPU, and its clear errors for CUDA-only options."""

import pytest
import torch

import fxsparse
from fxsparse import IgnoredScope, TargetScope

from conftest import tiny_llama, token_batches


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama()
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)
    torch.compiler.reset()
    plan = fxsparse.calibrate(model, token_batches(4, seq=32), {TargetScope(patterns=[r".*mlp\..*"]): 0.5},
                              IgnoredScope(names=["lm_head"]), progress=False)
    plan.save(folder / "plan.json")
    return folder


def test_cli_bench_cpu(model_dir, capsys):
    from fxsparse.cli import main

    rc = main(["bench", "--model", str(model_dir), "--plan", str(model_dir / "plan.json"), "--device",
               "cpu", "--mode", "default", "--prompt-len", "8", "--new-tokens", "4", "--warmup", "1",
               "--batch", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | ms/token")
    assert rows[1].startswith("| dense (Inductor) |") and rows[1].endswith("| 1.00x |")
    assert rows[2].startswith("| sparse_act |") and rows[2].endswith("x |")


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--mode", "reduce-overhead"], "needs --device cuda"),
    (["--device", "cpu", "--new-tokens", "0"], "at least 1"),
])
def test_cli_bench_errors_before_loading(tmp_path, capsys, argv, message):
    from fxsparse.cli import main

    # the model path does not exist: the option check must come first
    rc = main(["bench", "--plan", str(tmp_path / "plan.json"), "--model", str(tmp_path / "none"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_cli_bench_without_cuda(tmp_path, capsys):
    from fxsparse.cli import main

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    rc = main(["bench", "--plan", str(tmp_path / "plan.json"), "--device", "cuda"])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


def test_cli_calibrate_with_target_patterns(model_dir, tmp_path, capsys):
    """``--target REGEX=SPARSITY`` names layers of any architecture (the presets are Llama's);
    ``--ignore`` leaves matches dense; a malformed target fails before the model loads."""
    from fxsparse import SparsityPlan
    from fxsparse.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i % 96}" for i in range(4000)))
    out = tmp_path / "plan.json"
    rc = main(["calibrate", "--model", str(model_dir), "--calib-text", str(text), "--seq-len", "32",
               "--calib-windows", "4", "--target", r".*self_attn\.o_proj=0.3", "--target", r".*down_proj=0.5",
               "--ignore", r"model\.layers\.1\..*", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    plan = SparsityPlan.load(out)
    assert sorted(plan.layers) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    assert plan.layers["model.layers.0.self_attn.o_proj"].target_sparsity == 0.3
    for bad in (["--target", "no-sparsity"], ["--target", ".*=lots"], ["--mlp", "0", "--down", "0"]):
        rc = main(["calibrate", "--model", str(tmp_path / "missing"), "--out", str(out), *bad])
        assert rc == 2 and "fxsparse calibrate: error:" in capsys.readouterr().err
