"""`import-hf --verify` and `export-hf --verify`: the per-tensor comparison (verify_tensors.py) and, with
transformers installed, HF's model against dsv4's (verify_model.py), as one report.

    report = {"tensors": [per-tensor rows], "model": {"ran": bool, "reason" | "dtype", "tolerance", ...},
              "layers": [per-layer rows], "logits": row or None, "problems": [text], "ok": bool}

`ok` is False when a tensor row fails, the model comparison ran and a row is over its tolerance, or
a problem was found (e.g. the export's names are not the layout asked for); the commands exit 1 then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dsv4cli.infer.verify_tensors import TensorRow, compare, rows_json


def _report(rows: list[TensorRow], model: dict, problems: list[str]) -> dict:
    ok = all(r.ok for r in rows) and not problems and (not model["ran"] or model["ok"])
    return {"tensors": rows_json(rows), "model": {k: v for k, v in model.items() if k not in ("layers", "logits")},
            "layers": model.get("layers", []), "logits": model.get("logits"), "problems": problems, "ok": ok}


def verify_import(hf_dir: str | Path, checkpoint: str | Path, spec_file: str | Path, layers: Optional[int] = None,
                  experts: Optional[int] = None, model: bool = True) -> dict:
    """OUT's checkpoint (read back from disk) against HF_DIR's tensors, dequantized and cut as import-hf
    does; then HF's model of HF_DIR against dsv4's of the checkpoint (not for a toy variant)."""
    from dsv4cli.infer.dequant import block_size
    from dsv4cli.infer.import_hf import read_sources
    from dsv4cli.infer.verify_model import compare_models
    from dsv4cli.spec.load import load_spec

    cfg, sources, _layout, _notes = read_sources(Path(hf_dir), layers, experts)
    rows = compare(sources, Path(checkpoint), written_is_checkpoint=True, block=block_size(cfg))
    if layers is not None or experts is not None:
        result = {"ran": False, "reason": "a toy variant (--layers / --experts) has no HF model to compare with"}
    elif not model:
        result = {"ran": False, "reason": "not asked for"}
    else:
        result = compare_models(hf_dir, load_spec(spec_file), str(checkpoint))
    return _report(rows, result, [])


def verify_export(checkpoint: str | Path, export_dir: str | Path, layout: str = "hf", model: bool = True) -> dict:
    """Every tensor of the export (`export_dir`, in `layout`'s names) against the checkpoint tensor(s) it
    came from; then HF's model of the export against dsv4's of the checkpoint."""
    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.infer.dequant import block_size, fold_scales
    from dsv4cli.infer.hf_config import read_json
    from dsv4cli.infer.hf_names import detect_layout
    from dsv4cli.infer.safetensors_io import tensor_sources
    from dsv4cli.infer.verify_model import compare_models

    export_dir = Path(export_dir)
    info = read_checkpoint_info(checkpoint)
    found = tensor_sources(export_dir)
    problems = []
    detected = detect_layout(found)
    if detected != layout:
        problems.append(f"{export_dir} has {detected}-layout names, not {layout}")
    rows = compare(fold_scales(found), info.iter_dir, written_is_checkpoint=False,
                   block=block_size(read_json(export_dir / "config.json")))
    result = compare_models(export_dir, info.spec, str(info.iter_dir)) if model else {"ran": False, "reason": "not asked for"}
    return _report(rows, result, problems)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def render(report: dict) -> list[str]:
    """The report as text lines: the per-tensor table, the model table (or why it did not run), a verdict."""
    t = report["tensors"]
    lines = _table(["tensor", "shape", "dtype", "source dtype", "max abs diff", "matches original", ""],
                   [[r["name"], "x".join(map(str, r["shape"])) or "[]", r["written"], r["source"],
                     _fmt(r["max_abs_diff"]), "yes" if r["matches"] else "no",
                     ("" if r["ok"] else "FAIL ") + r["note"]] for r in t])
    failed = [r["name"] for r in t if not r["ok"]]
    lines.append(f"tensors: {len(t)} compared, {sum(r['matches'] for r in t)} match the original bit for bit, "
                 f"{len(failed)} failed" + (f" (first: {failed[0]})" if failed else ""))
    model = report["model"]
    if not model["ran"]:
        lines.append(f"model comparison: not run ({model['reason']})")
    else:
        tol = model["tolerance"]
        judged = ("max abs diff <= {atol:g} + {rtol:g} x max|HF| and " if tol["atol"] is not None else "") + "cosine >= {min_cosine:g}"
        lines.append(f"model comparison, HF transformers vs dsv4 on {model['sequences']} sequences "
                     f"(HF {model['dtype']['hf']}, dsv4 {model['dtype']['dsv4']}; a row passes with "
                     + judged.format(**tol) + "):")
        rows = [*report["layers"], report["logits"]]
        lines += _table(["output", "max abs diff", "cosine", "limit", ""],
                        [[r["name"], _fmt(r["max_abs_diff"]), f"{r['cosine']:.8f}", _fmt(r["limit"]),
                          "ok" if r["ok"] else "FAIL"] for r in rows])
    lines += [f"problem: {p}" for p in report["problems"]]
    lines.append("verify: OK" if report["ok"] else "verify: FAILED")
    return lines
