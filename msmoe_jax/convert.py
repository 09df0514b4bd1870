"""Convert Hugging Face MoE checkpoints to and from msmoe-jax.

    python -m msmoe_jax.convert import --from HF_DIR --out OUT_DIR [--config run.yaml]
                                      [--set k=v] [--force]
    python -m msmoe_jax.convert export --from CKPT_DIR --out HF_DIR [--config run.yaml] [--force]

``import`` reads ``config.json`` and the safetensors files of HF_DIR, maps the architecture onto
our model config (refusing what our model would compute differently; a key config.json leaves
out means what transformers defaults it to), builds every parameter directly on its sharding
over this run's mesh and saves an Orbax checkpoint of the parameters in OUT_DIR, with
``config.yaml`` (the run config to train it with) beside it. ``--config``/``--set`` give
everything but the model section, which comes from the checkpoint; without ``--config`` that
is the built-in defaults of ``msmoe_jax/config.py`` (data parallel over all devices, experts
not split; not ``configs/default.yaml``, whose layout is written for its own 8-expert model).
``--set model.aux_loss_coef=...`` / ``model.z_loss_coef=...`` replace the imported values.
Start training from it with ``python train.py --config OUT_DIR/config.yaml`` (which sets
``checkpoint.init_from``). The data section is kept as given: a vocabulary under 256 cannot
train on ``data.source: stdlib`` (bytes), and import then says to set ``data.source: tokens``.

``export`` writes ``config.json`` + ``model.safetensors`` from an imported directory or a
training checkpoint step (``runs/X/checkpoints/N``, whose config is ``runs/X/config.json``).

OUT_DIR may exist. If it already holds a model (import: ``params/``, ``config.yaml``;
export: ``config.json``, ``*.safetensors``, ``model.safetensors.index.json``) the command
stops unless ``--force`` is given; export with ``--force`` deletes those files first (so no
shard of the old model is left to be loaded with the new one) and keeps the others
(tokenizer files).

Router losses. transformers' ``router_aux_loss_coef`` c_hf and our ``model.aux_loss_coef`` c
are related by c = top_k * c_hf (export divides): transformers adds
c_hf * E * sum_e F_e P_e with F, P the assignment fractions (summing to top_k) and mean
probabilities pooled over all L MoE layers' tokens; we add c times the mean over layers of
E * sum_e f_le p_le with fractions summing to 1. The two terms are equal when every layer
assigns the same number of tokens to each expert (or L = 1); otherwise they differ by
c_hf * E / (2 L^2 T^2) * sum_{l,l'} <c_l - c_l', q_l - q_l'> (counts c_l and probability sums
q_l of layer l's T tokens): ``msmoe_jax.hf.families.aux_loss_coef_from_hf`` derives it.
transformers adds the term only when ``output_router_logits`` is true; import maps the
coefficient regardless (it is the strength to fine-tune with; ``--set model.aux_loss_coef=0``
turns it off) and export writes ``output_router_logits: false``, transformers' default. None
of the families has a router z-loss: import sets ``model.z_loss_coef`` to 0, and export,
which cannot carry a non-zero one, says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from msmoe_jax.cli import simulate_cpu_devices
from msmoe_jax.config import Config, ConfigError, ModelConfig, config_from_dict, read_config_file
from msmoe_jax.hf.families import ConversionError, family_for_export, family_of

PARAMS = "params"  # the Orbax item of an imported directory
CONFIG = "config.yaml"
STDLIB_MIN_VOCAB = 256  # data.source stdlib is byte-level (Config.validate)
HF_MODEL_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")


def read_hf_config(hf_dir: Path) -> dict:
    """HF_DIR/config.json as a dict; every problem a ConversionError naming the file."""
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: no such directory (--from names a Hugging Face "
                              "checkpoint directory)")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint "
                              "directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno}); fix the file or download it again") from None
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e.reason}); fix the file or download "
                              "it again") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: expected a JSON object at the top level, got "
                              f"{type(hf).__name__}")
    return hf


def hf_model_config(hf_dir: Path, base: ModelConfig) -> tuple[ModelConfig, str]:
    """(our ModelConfig for the HF checkpoint, its architecture); the fields a checkpoint does
    not determine (dtypes, MoE mode, expert compute) come from ``base``."""
    hf = read_hf_config(hf_dir)
    path = hf_dir / "config.json"
    try:
        family = family_of(hf)
        fields = family.model_config(hf)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    try:  # type-checks every field, naming it
        model = config_from_dict({"model": {**dataclasses.asdict(base), **fields}}).model
    except ConfigError as e:
        raise ConversionError(f"{path}: gives an invalid model: {e}") from None
    return model, family.architecture


def validate_run(cfg: Config, device_count: int | None = None) -> Config:
    """``Config.validate`` (and ``validate_for`` with a device count), except that the data
    section does not judge the model: a vocabulary under 256 with ``data.source: stdlib`` (a
    byte corpus) passes, for ``data_note`` to report. Returns ``cfg``."""
    check = cfg
    if cfg.data.source == "stdlib" and 1 <= cfg.model.vocab_size < STDLIB_MIN_VOCAB:
        check = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, vocab_size=STDLIB_MIN_VOCAB))
    if device_count is None:
        check.validate()
    else:
        from msmoe_jax.parallel.mesh import validate_for
        validate_for(check, device_count)
    return cfg


def data_note(cfg: Config) -> str | None:
    """What the user must set before training ``cfg``, if its data section cannot feed it."""
    if cfg.data.source == "stdlib" and cfg.model.vocab_size < STDLIB_MIN_VOCAB:
        return (f"data.source: 'stdlib' is a byte corpus (token ids up to 255) but the model's "
                f"vocabulary has {cfg.model.vocab_size} tokens; before training set "
                "data.source: tokens and data.path: a file of this tokenizer's ids")
    return None


def export_notes(cfg: Config) -> list[str]:
    """What an export cannot carry."""
    if cfg.model.z_loss_coef:
        return [(f"model.z_loss_coef: {cfg.model.z_loss_coef:g} is not in the exported "
                 "config.json (transformers has no router z-loss for these models); the weights "
                 "are exact")]
    return []


def check_out_dir(out_dir: Path, force: bool, held: tuple[str, ...], what: str) -> list[Path]:
    """Refuses an --out that is a file, or a directory holding a model (files matching
    ``held``) unless ``force``. Returns those files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir}: exists and is not a directory; --out names the "
                              f"directory to write the {what} into")
    found = (sorted({f for pattern in held for f in out_dir.glob(pattern)})
             if out_dir.is_dir() else [])
    if found and not force:
        names = ", ".join(f.name for f in found)
        raise ConversionError(f"{out_dir}: already holds a model ({names}); choose another "
                              "--out, or pass --force to replace it")
    return found


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, cfg: Config, devices=None,
                      force: bool = False, model_overrides: dict | None = None) -> Config:
    """Imports HF_DIR into OUT_DIR under ``cfg``'s layout (its model section is replaced by
    the checkpoint's, then ``model_overrides`` applied). Returns the run config written
    beside the parameters. ``force``: replace a model already in OUT_DIR."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    model, arch = hf_model_config(hf_dir, cfg.model)
    model = dataclasses.replace(model, **(model_overrides or {}))
    check_out_dir(out_dir, force, (PARAMS, CONFIG), "imported model")

    import jax
    import orbax.checkpoint as ocp

    from msmoe_jax.hf.families import FAMILIES, hf_names
    from msmoe_jax.hf.io import Reader, expected_shape, load_param
    from msmoe_jax.parallel.mesh import Layout, make_mesh
    from msmoe_jax.state import init_state

    cfg = dataclasses.replace(cfg, model=model)
    devices = list(jax.devices() if devices is None else devices)
    validate_run(cfg, len(devices))
    layout = Layout.from_config(cfg, len(devices))
    mesh = make_mesh(layout, devices)
    _, _, abstract, _ = init_state(cfg, mesh, layout, abstract=True)
    target = abstract["params"]

    reader = Reader(hf_dir)
    sources = FAMILIES[arch].tensors(model)
    leaves = jax.tree.leaves_with_path(target)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    missing = [p for p in paths if p not in sources]
    if missing:
        raise ConversionError(f"{arch}: no source for our parameters {missing[:3]}")
    used = {n for s in sources.values() for n in hf_names(s)}
    unused = sorted(set(reader.weight_map) - used)
    if unused:
        raise ConversionError(f"{hf_dir}: tensors our {arch} model has no place for (they would "
                              f"be lost): {', '.join(unused[:5])}")
    arrays = []
    for i, ((_, x), path) in enumerate(zip(leaves, paths)):
        expected_shape(reader, sources[path], x.shape, path)
        arrays.append(load_param(reader, sources[path], x.shape, x.dtype, x.sharding))
        if jax.process_index() == 0 and (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(leaves)} parameters read", flush=True)
    params = jax.tree.unflatten(jax.tree.structure(target), arrays)

    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out_dir / PARAMS, params, force=True)
    run = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
        cfg.checkpoint, init_from=str(out_dir)))
    if jax.process_index() == 0:
        note = data_note(run)
        (out_dir / CONFIG).write_text((f"# note: {note}\n" if note else "")
                                      + yaml.safe_dump(run.to_dict(), sort_keys=False))
        (out_dir / "source.json").write_text(json.dumps(
            {"architecture": arch, "from": str(hf_dir.absolute())}, indent=2))
    return run


def restore_params(path: str | Path, cfg: Config, mesh, layout):
    """Parameters from an imported directory (``params``) or a training checkpoint step
    (``state``), placed on ``mesh`` as ``layout`` shards them."""
    import orbax.checkpoint as ocp

    from msmoe_jax.checkpoint import UNSTACKED, saved_names, unstacked_layers
    from msmoe_jax.state import init_state

    path = Path(path).absolute()
    _, _, abstract, _ = init_state(cfg, mesh, layout, abstract=True)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            if (path / PARAMS).is_dir():
                return ckpt.restore(path / PARAMS, abstract["params"])
            if (path / "state").is_dir():
                return ckpt.restore(path / "state", abstract)["params"]
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report them plainly
        if unstacked_layers(saved_names(path)):
            raise ConversionError(f"{path}: {UNSTACKED}") from None
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ConversionError(f"{path}: could not restore parameters for this model config "
                              f"({type(e).__name__}: {msg})") from e
    raise ConversionError(f"{path}: neither an imported directory ({PARAMS}/) nor a training "
                          "checkpoint step (state/)")


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, cfg: Config,
                      force: bool = False) -> Path:
    """Writes OUT_DIR/config.json + model.safetensors for the parameters in CKPT_DIR.
    ``force``: replace a Hugging Face model already in OUT_DIR (its config.json and
    safetensors files are deleted first; other files stay)."""
    family = family_for_export(cfg.model)
    hf_config = family.hf_config(cfg.model)
    out_dir = Path(out_dir)
    old = check_out_dir(out_dir, force, HF_MODEL_FILES, "Hugging Face checkpoint")
    if not Path(ckpt_dir).is_dir():
        raise ConversionError(f"{ckpt_dir}: no such directory")

    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from safetensors.numpy import save_file

    from msmoe_jax.hf.io import to_hf
    from msmoe_jax.parallel.mesh import Layout, make_mesh

    devices = jax.devices()
    layout = Layout.from_config(cfg, len(devices))
    mesh = make_mesh(layout, devices)
    params = restore_params(ckpt_dir, cfg, mesh, layout)
    by_path = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
               for p, x in jax.tree.leaves_with_path(params)}
    tensors = to_hf(family.tensors(cfg.model), by_path)
    if jax.process_index() == 0:
        for f in old:
            f.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


def read_config(path: str | Path | None, overrides: list[str]) -> Config:
    """``config.load_config`` with ``validate_run``'s checks: the data section does not judge
    the model (an imported model's config.yaml may carry a data note)."""
    return validate_run(config_from_dict(read_config_file(path), overrides))


def export_config(ckpt_dir: Path, given: str | None, overrides: list[str]) -> Config:
    """The run config of a checkpoint: ``--config``, else the imported directory's
    config.yaml, else the training run's config.json two levels up."""
    if given:
        return read_config(given, overrides)
    if not ckpt_dir.is_dir():
        raise ConversionError(f"{ckpt_dir}: no such directory (--from names an imported "
                              "directory or a training checkpoint step)")
    for candidate in (ckpt_dir / CONFIG, ckpt_dir.parent.parent / "config.json"):
        if candidate.is_file():
            return read_config(candidate, overrides)
    raise ConversionError(f"{ckpt_dir}: no {CONFIG} here nor config.json in the run directory; "
                          "pass --config")


OBJECTIVE_OVERRIDES = ("model.aux_loss_coef", "model.z_loss_coef")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")).strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=("import", "export"))
    p.add_argument("--from", dest="src", required=True, help="the directory to read")
    p.add_argument("--out", required=True,
                   help="the directory to write (one already holding a model: needs --force)")
    p.add_argument("--config", help="run config (layout, dtypes, training; the model section "
                                    "comes from the checkpoint). import: default the built-in "
                                    "defaults of msmoe_jax/config.py (not configs/default.yaml); "
                                    "export: default the checkpoint's own config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field; on import model.aux_loss_coef and "
                        "model.z_loss_coef replace the values mapped from the checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace a model already in --out")
    args = p.parse_args(argv)
    try:
        if args.direction == "import":
            base = read_config(args.config, args.overrides)
            keys = {o.split("=", 1)[0].strip() for o in args.overrides}
            objective = {k.split(".", 1)[1]: getattr(base.model, k.split(".", 1)[1])
                         for k in OBJECTIVE_OVERRIDES if k in keys}
            simulate_cpu_devices(base.run.cpu_devices)
            run = import_checkpoint(args.src, args.out, base, force=args.force,
                                    model_overrides=objective)
            print(f"imported {args.src} -> {args.out} ({run.model.num_layers} layers, "
                  f"{run.model.num_experts} experts); train with: python train.py --config "
                  f"{Path(args.out) / CONFIG}")
            notes = [n for n in (data_note(run),) if n]
        else:
            cfg = export_config(Path(args.src), args.config, args.overrides)
            simulate_cpu_devices(cfg.run.cpu_devices)
            out = export_checkpoint(args.src, args.out, cfg, force=args.force)
            print(f"exported {args.src} -> {out}")
            notes = export_notes(cfg)
    except (ConfigError, ConversionError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable or unwritable files: say which, without a traceback
        where = e.filename or "file system"
        print(f"error: {where}: {e.strerror or one_line(e)}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
