"""``python -m msmoe_jax.convert``: what a user gets wrong (a damaged config.json, an --out that
is a file or already holds a model, a missing --from) is one ``error: ...`` line and exit code
2; import without --config uses the defaults its help names; a vocabulary under 256 imports
(the data section is the user's to set, and import says so)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from msmoe_jax.config import Config, ConfigError, load_config  # noqa: E402
from msmoe_jax.convert import main  # noqa: E402
from support import ROOT, tiny_mixtral  # noqa: E402

pytestmark = pytest.mark.slow  # whole trainings or many compiles (-m 'not slow' skips)


def run(capsys, *argv):
    """main(argv) -> (exit code, stdout, the stderr lines starting with 'error:' or 'note:')."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, [line for line in err.splitlines() if line.startswith(("error:", "note:"))]


def error_line(capsys, *argv) -> str:
    rc, _, lines = run(capsys, *argv)
    errors = [line for line in lines if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, (rc, lines)
    return errors[0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny Mixtral with a 100-token vocabulary, imported by the CLI without --config."""
    tmp = tmp_path_factory.mktemp("imported")
    hf = tiny_mixtral(tmp / "hf", vocab_size=100)
    rc = main(["import", "--from", str(tmp / "hf"), "--out", str(tmp / "ours")])
    assert rc == 0
    return tmp, hf


def test_damaged_config_json_is_one_error_line(tmp_path, capsys):
    good = dict(transformers.MixtralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_local_experts=4).to_dict(), architectures=["MixtralForCausalLM"])
    hf = tmp_path / "hf"
    hf.mkdir()
    path = hf / "config.json"

    def error_for(text):
        path.write_text(text)
        return error_line(capsys, "import", "--from", hf, "--out", tmp_path / "ours")

    line = error_for('{"vocab_size": 256,')
    assert line.startswith(f"error: {path}: not valid JSON (") and "line 1" in line
    assert error_for("[1, 2]") == (f"error: {path}: expected a JSON object at the top level, "
                                   "got list")
    for key in ("vocab_size", "hidden_size", "num_experts_per_tok", "intermediate_size"):
        line = error_for(json.dumps({k: v for k, v in good.items() if k != key}))
        assert line.startswith(f"error: {path}: {key}: required key is missing"), line
    line = error_for(json.dumps({k: v for k, v in good.items() if k != "num_local_experts"}))
    assert line.startswith(f"error: {path}: num_local_experts: required key is missing"), line
    assert error_for(json.dumps(dict(good, vocab_size="256"))) == (
        f"error: {path}: vocab_size: expected a positive integer, got '256'")
    assert error_for(json.dumps(dict(good, rms_norm_eps="tiny"))) == (
        f"error: {path}: rms_norm_eps: expected a number, got 'tiny'")
    line = error_for(json.dumps(dict(good, num_key_value_heads="2")))
    assert line.startswith(f"error: {path}: gives an invalid model: model.num_kv_heads:"), line
    assert not (tmp_path / "ours").exists()

    # The same from a fresh process: one line, exit code 2, no traceback.
    path.write_text("{oops")
    r = subprocess.run([sys.executable, "-m", "msmoe_jax.convert", "import", "--from", str(hf),
                        "--out", str(tmp_path / "ours")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {path}: not valid JSON (Expecting property name enclosed in double quotes at "
        "line 1 column 2); fix the file or download it again"]


def test_import_without_config_uses_the_defaults_its_help_names(imported, capsys):
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default the built-in defaults of msmoe_jax/config.py (not configs/default.yaml)" in text
    tmp, _ = imported
    written = yaml.safe_load((tmp / "ours" / "config.yaml").read_text())
    defaults = Config().to_dict()
    for section in ("parallel", "train", "optimizer", "data", "run"):
        assert written[section] == defaults[section], section


def test_small_vocabulary_imports_and_says_what_to_set(imported, tmp_path, capsys):
    """data.source stdlib (bytes) cannot feed a 100-token model: import still writes the
    checkpoint and config.yaml, and says (on stderr and atop config.yaml) what to set."""
    tmp, hf = imported
    text = (tmp / "ours" / "config.yaml").read_text()
    assert text.startswith("# note: data.source: 'stdlib' is a byte corpus")
    assert yaml.safe_load(text)["model"]["vocab_size"] == 100
    with pytest.raises(ConfigError, match="model.vocab_size: must be >= 256 for the byte-level"):
        load_config(tmp / "ours" / "config.yaml")
    tokens = tmp_path / "tokens.bin"
    np.arange(50, dtype=np.uint16).tofile(tokens)
    load_config(tmp / "ours" / "config.yaml", ["data.source=tokens", f"data.path={tokens}"])

    rc, _, lines = run(capsys, "import", "--from", tmp / "hf", "--out", tmp_path / "again")
    assert rc == 0 and lines == [
        "note: data.source: 'stdlib' is a byte corpus (token ids up to 255) but the model's "
        "vocabulary has 100 tokens; before training set data.source: tokens and data.path: a "
        "file of this tokenizer's ids"]
    # Export reads that config.yaml back.
    rc, _, lines = run(capsys, "export", "--from", tmp / "ours", "--out", tmp_path / "back")
    assert rc == 0 and lines == []
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back")
    for (name, a), (_, b) in zip(sorted(hf.state_dict().items()),
                                 sorted(back.state_dict().items())):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_out_and_from_are_checked(imported, tmp_path, capsys):
    tmp, hf = imported
    ours = tmp / "ours"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for direction, src in (("export", ours), ("import", tmp / "hf")):
        assert error_line(capsys, direction, "--from", src, "--out", a_file) == (
            f"error: {a_file}: exists and is not a directory; --out names the directory to "
            f"write the {'Hugging Face checkpoint' if direction == 'export' else 'imported model'}"
            " into")
        line = error_line(capsys, direction, "--from", tmp_path / "nowhere",
                          "--out", tmp_path / "o")
        assert line.startswith(f"error: {tmp_path / 'nowhere'}: no such directory"), line

    # Import over an imported model: refused, unless --force.
    line = error_line(capsys, "import", "--from", tmp / "hf", "--out", ours)
    assert line == (f"error: {ours.absolute()}: already holds a model (config.yaml, params); "
                    "choose another --out, or pass --force to replace it")

    # Export into a directory holding another Hugging Face model (sharded: an index and two
    # shards that transformers would load instead) is refused; --force replaces the model's
    # files and keeps the rest.
    out = tmp_path / "hf_out"
    out.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                 "tokenizer.json"):
        (out / name).write_text("{}")
    line = error_line(capsys, "export", "--from", ours, "--out", out)
    assert line == (f"error: {out}: already holds a model (config.json, "
                    "model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, "
                    "model.safetensors.index.json); choose another --out, or pass --force to "
                    "replace it")
    rc, _, _ = run(capsys, "export", "--from", ours, "--out", out, "--force")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                      "tokenizer.json"]
    back = transformers.MixtralForCausalLM.from_pretrained(out)
    np.testing.assert_array_equal(back.lm_head.weight.detach().numpy(),
                                  hf.lm_head.weight.detach().numpy())


def test_objective_overrides_win_and_export_notes_the_z_loss(imported, tmp_path, capsys):
    """--set model.aux_loss_coef / model.z_loss_coef replace what import maps from the
    checkpoint (top_k * router_aux_loss_coef; no z-loss); export cannot carry a z-loss and
    says so, and writes the aux coefficient back in transformers' terms."""
    tmp, hf = imported
    written = yaml.safe_load((tmp / "ours" / "config.yaml").read_text())["model"]
    assert written["aux_loss_coef"] == pytest.approx(2 * hf.config.router_aux_loss_coef)
    assert written["z_loss_coef"] == 0.0
    rc, _, _ = run(capsys, "import", "--from", tmp / "hf", "--out", tmp_path / "ours",
                   "--set", "model.aux_loss_coef=0.05", "--set", "model.z_loss_coef=0.002")
    assert rc == 0
    written = yaml.safe_load((tmp_path / "ours" / "config.yaml").read_text())["model"]
    assert (written["aux_loss_coef"], written["z_loss_coef"]) == (0.05, 0.002)
    rc, _, lines = run(capsys, "export", "--from", tmp_path / "ours", "--out", tmp_path / "back")
    assert rc == 0 and lines == [
        "note: model.z_loss_coef: 0.002 is not in the exported config.json (transformers has "
        "no router z-loss for these models); the weights are exact"]
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["router_aux_loss_coef"] == pytest.approx(0.025)
    assert exported["output_router_logits"] is False
