"""Convert Hugging Face MoE checkpoints to and from msmoe-jax.

    python -m msmoe_jax.convert import --from HF_DIR --out OUT_DIR [--config run.yaml] [--set k=v]
    python -m msmoe_jax.convert export --from CKPT_DIR --out HF_DIR [--config run.yaml]

``import`` reads ``config.json`` and the safetensors files of HF_DIR, maps the architecture onto
our model config (refusing what our model would compute differently), builds every parameter
directly on its sharding over this run's mesh (``--config``/``--set`` choose the layout; the
model section comes from the checkpoint) and saves an Orbax checkpoint of the parameters in
OUT_DIR, with ``config.yaml`` (the run config to train it with) beside it. Start training from
it with ``python train.py --config OUT_DIR/config.yaml`` (which sets ``checkpoint.init_from``).

``export`` writes ``config.json`` + ``model.safetensors`` from an imported directory or a
training checkpoint step (``runs/X/checkpoints/N``, whose config is ``runs/X/config.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from msmoe_jax.cli import simulate_cpu_devices
from msmoe_jax.config import Config, ConfigError, ModelConfig, config_from_dict, load_config
from msmoe_jax.hf.families import ConversionError, family_for_export, family_of

PARAMS = "params"  # the Orbax item of an imported directory
CONFIG = "config.yaml"


def hf_model_config(hf_dir: Path, base: ModelConfig) -> tuple[ModelConfig, str]:
    """(our ModelConfig for the HF checkpoint, its architecture); dtypes come from ``base``."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json")
    hf = json.loads(path.read_text())
    family = family_of(hf)
    fields = family.model_config(hf)
    model = dataclasses.replace(base, **fields)
    return model, family.architecture


def import_checkpoint(hf_dir: str | Path, out_dir: str | Path, cfg: Config, devices=None) -> Config:
    """Imports HF_DIR into OUT_DIR under ``cfg``'s layout (its model section is replaced by
    the checkpoint's). Returns the run config written beside the parameters."""
    import jax
    import orbax.checkpoint as ocp

    from msmoe_jax.hf.families import FAMILIES
    from msmoe_jax.hf.io import Reader, expected_shape, load_param
    from msmoe_jax.parallel.mesh import Layout, make_mesh, validate_for
    from msmoe_jax.state import init_state

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    model, arch = hf_model_config(hf_dir, cfg.model)
    cfg = dataclasses.replace(cfg, model=model)
    devices = list(jax.devices() if devices is None else devices)
    validate_for(cfg, len(devices))
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
    used = {n for s in sources.values() for n in getattr(s, "names", (getattr(s, "name", None),))}
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
        (out_dir / CONFIG).write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
        (out_dir / "source.json").write_text(json.dumps(
            {"architecture": arch, "from": str(hf_dir.absolute())}, indent=2))
    return run


def restore_params(path: str | Path, cfg: Config, mesh, layout):
    """Parameters from an imported directory (``params``) or a training checkpoint step
    (``state``), placed on ``mesh`` as ``layout`` shards them."""
    import orbax.checkpoint as ocp

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
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ConversionError(f"{path}: could not restore parameters for this model config "
                              f"({type(e).__name__}: {msg})") from e
    raise ConversionError(f"{path}: neither an imported directory ({PARAMS}/) nor a training "
                          "checkpoint step (state/)")


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, cfg: Config) -> Path:
    """Writes OUT_DIR/config.json + model.safetensors for the parameters in CKPT_DIR."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from safetensors.numpy import save_file

    from msmoe_jax.hf.io import to_hf
    from msmoe_jax.parallel.mesh import Layout, make_mesh

    family = family_for_export(cfg.model)
    devices = jax.devices()
    layout = Layout.from_config(cfg, len(devices))
    mesh = make_mesh(layout, devices)
    params = restore_params(ckpt_dir, cfg, mesh, layout)
    by_path = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
               for p, x in jax.tree.leaves_with_path(params)}
    tensors = to_hf(family.tensors(cfg.model), by_path)
    out_dir = Path(out_dir)
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(family.hf_config(cfg.model), indent=2))
    return out_dir


def export_config(ckpt_dir: Path, given: str | None, overrides: list[str]) -> Config:
    """The run config of a checkpoint: ``--config``, else the imported directory's
    config.yaml, else the training run's config.json two levels up."""
    if given:
        return load_config(given, overrides)
    for candidate in (ckpt_dir / CONFIG, ckpt_dir.parent.parent / "config.json"):
        if candidate.is_file():
            raw = yaml.safe_load(candidate.read_text())
            return config_from_dict(raw, overrides).validate()
    raise ConversionError(f"{ckpt_dir}: no {CONFIG} here nor config.json in the run directory; "
                          "pass --config")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=("import", "export"))
    p.add_argument("--from", dest="src", required=True, help="the directory to read")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--config", help="run config (layout, dtypes); import: default "
                                    "configs/default.yaml with parallel.devices unset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        if args.direction == "import":
            base = load_config(args.config, args.overrides)
            simulate_cpu_devices(base.run.cpu_devices)
            run = import_checkpoint(args.src, args.out, base)
            print(f"imported {args.src} -> {args.out} ({run.model.num_layers} layers, "
                  f"{run.model.num_experts} experts); train with: python train.py --config "
                  f"{Path(args.out) / CONFIG}")
        else:
            cfg = export_config(Path(args.src), args.config, args.overrides)
            simulate_cpu_devices(cfg.run.cpu_devices)
            out = export_checkpoint(args.src, args.out, cfg)
            print(f"exported {args.src} -> {out}")
    except (ConfigError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
