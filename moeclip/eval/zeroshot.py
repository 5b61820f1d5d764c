"""Zero-shot classification: class names x prompt templates -> one text classifier, images ranked against it.

Computes what LAION's CLIP_benchmark (`clip_benchmark.metrics.zeroshot_classification.evaluate`) computes,
so numbers can be compared with published ones: each class's weight is the normalised mean of its
normalised template embeddings; top-1, top-5 (only with >= 5 classes) and mean per-class recall
(sklearn's balanced accuracy: the mean recall over the classes that occur in the labels).

Class names and templates come by name (`imagenet` / `openai`, `simple`: open_clip's copies of OpenAI's
lists) or from text files (one per line; a template holds `{}` or `{c}` where the class name goes).
Labels come from a table column. With class names given, a label must be one of them; if none of the labels
is a class name and every label is an integer in [0, classes), the labels are class indices (ImageNet-style
`0..999` columns); anything else is an error naming the first label that matches nothing.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from moeclip.data.dataset import CaptionDataset, DataError
from moeclip.model.encode import sharded_image_features, sharded_text_features, unique_first
from moeclip.runtime import Runtime

DEFAULT_TEMPLATES = ("a photo of a {}.",)
BUILTIN_CLASSNAMES = ("imagenet",)
BUILTIN_TEMPLATES = ("openai", "simple")


def builtin_classnames(name: str) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    if name == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    raise ValueError(f"no built-in class names {name!r}; built in: {', '.join(BUILTIN_CLASSNAMES)} (or a file path)")


def builtin_templates(name: str) -> list[str]:
    """open_clip keeps templates as lambdas; calling one with '{c}' gives the string form CLIP_benchmark uses."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
    table = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if name not in table:
        raise ValueError(f"no built-in templates {name!r}; built in: {', '.join(BUILTIN_TEMPLATES)} (or a file path)")
    return [t("{c}") for t in table[name]]


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} file is not UTF-8 text ({e})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path}: {what} file is empty; write one {what[:-1]} per line")
    return lines


def load_classnames(spec: str) -> list[str]:
    """A built-in name (`imagenet`) or a text file with one class name per line (blank lines ignored)."""
    if spec in BUILTIN_CLASSNAMES:
        return builtin_classnames(spec)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such class-names file (built in: {', '.join(BUILTIN_CLASSNAMES)})")
    names = _read_lines(path, "class names")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DataError(f"{path}: class name {dup!r} appears more than once; class names must be unique")
    return names


def load_templates(spec: str) -> list[str]:
    """A built-in name (`openai`, `simple`) or a text file with one template per line, each with `{}` or `{c}`."""
    if spec in BUILTIN_TEMPLATES:
        return builtin_templates(spec)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such templates file (built in: {', '.join(BUILTIN_TEMPLATES)})")
    templates = _read_lines(path, "templates")
    for i, t in enumerate(templates):
        check_template(t, f"{path}:{i + 1}")
    return templates


def check_template(template: str, where: str = "template") -> None:
    try:
        filled = fill(template, "\0")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: template {template!r} is not a format string with {{}} or {{c}} ({e!r}); "
                         "escape other braces as {{ }}") from None
    if "\0" not in filled:
        raise ValueError(f"{where}: template {template!r} has no {{}} or {{c}} for the class name")


def fill(template: str, classname: str) -> str:
    """`{}` and `{c}` both take the class name (open_clip/our CLI use `{}`, CLIP_benchmark `{c}`)."""
    return template.format(classname, c=classname)


def labels_to_indices(labels: Sequence[str], classnames: Sequence[str], where: str = "labels") -> np.ndarray:
    """Class index of every label: by name, or by integer index when no label is a name (module docstring)."""
    index = {n: i for i, n in enumerate(classnames)}
    labels = [str(x).strip() for x in labels]
    if any(x in index for x in labels):
        unknown = next((x for x in labels if x not in index), None)
        if unknown is not None:
            raise DataError(f"{where}: label {unknown!r} is not among the {len(classnames)} class names; "
                            "fix the label or add it to the class-names file")
        return np.array([index[x] for x in labels], dtype=np.int64)
    try:
        ids = np.array([int(x) for x in labels], dtype=np.int64)
    except ValueError:
        bad = next(x for x in labels if not x.lstrip("-").isdigit())
        raise DataError(f"{where}: label {bad!r} is neither one of the {len(classnames)} class names "
                        f"(e.g. {classnames[0]!r}) nor a class index") from None
    out = ids[(ids < 0) | (ids >= len(classnames))]
    if out.size:
        raise DataError(f"{where}: class index {int(out[0])} is outside 0..{len(classnames) - 1}")
    return ids


@torch.no_grad()
def classifier_weights(model: nn.Module, tokenizer: Callable, classnames: Sequence[str],
                       templates: Sequence[str], runtime: Runtime | None = None,
                       batch_size: int = 512) -> torch.Tensor:
    """[C, d]: per class, the normalised mean of its normalised prompt embeddings (CLIP_benchmark's order of ops)."""
    rt = runtime or Runtime.local()
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    for t in templates:
        check_template(t)
    texts = [fill(t, c) for c in classnames for t in templates]
    feats = sharded_text_features(model, tokenizer, texts, batch_size, rt)  # normalised, [C*T, d]
    w = feats.reshape(len(classnames), len(templates), -1).mean(1)
    return w / w.norm(dim=-1, keepdim=True)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """top1, top5 (>= 5 classes; CLIP_benchmark's rule), mean per-class recall over the classes present."""
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    out: dict[str, Any] = {"top1": float((pred == targets).double().mean()), "num_classes": num_classes,
                           "num_images": int(targets.numel())}
    if num_classes >= 5:
        out["top5"] = float((logits.topk(5, dim=1).indices == targets[:, None]).any(1).double().mean())
    recalls = [float((pred[targets == c] == c).double().mean()) for c in torch.unique(targets).tolist()]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    return out


def zero_shot(model: nn.Module, tokenizer: Callable, image_features: torch.Tensor, labels: Sequence[str],
              templates: Sequence[str] = DEFAULT_TEMPLATES, runtime: Runtime | None = None,
              classnames: Sequence[str] | None = None, where: str = "labels") -> dict[str, Any]:
    """Metrics of normalised `image_features` [N, d] against their `labels`.

    classnames None: the classes are the distinct labels, sorted (the label text is the class name).
    """
    classes = list(classnames) if classnames is not None else sorted({str(x).strip() for x in labels})
    targets = labels_to_indices(labels, classes, where)
    weights = classifier_weights(model, tokenizer, classes, templates, runtime)
    return classification_metrics(image_features.float() @ weights.t(), targets)


@torch.no_grad()
def evaluate_zeroshot(model: nn.Module, preprocess: Callable, tokenizer: Callable, table: str | Path,
                      class_column: str, classnames: Sequence[str] | None = None,
                      templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256,
                      runtime: Runtime | None = None, num_workers: int = 0, progress: bool = True,
                      image_root: str | Path | None = None) -> dict[str, Any]:
    """Zero-shot classification of a CSV/TSV with `filepath` and `class_column` (no caption column needed).

    Each distinct image counts once, with the label of its first row. Collective under a multi-rank runtime.
    """
    rt = runtime or Runtime.local()
    model = model.to(rt.device).eval()
    from moeclip.data.formats import data_format
    if data_format(table) == "shards" or (Path(table).exists() and data_format(table) != "table"):
        raise DataError(f"{table}: zero-shot classification reads a CSV/TSV with 'filepath' and a class column, "
                        f"not a {data_format(table)} caption file (with captions, `--task all --class-column` "
                        "classifies too)")
    try:
        ds = CaptionDataset(table, preprocess, caption_key=class_column, image_root=image_root)
    except DataError as e:
        if "missing column" in str(e):  # the generic message speaks of captions; here it is the class column
            raise DataError(f"{table}: zero-shot classification needs a 'filepath' column and the class column "
                            f"'{class_column}' (--class-column); {str(e).split('; ')[1]}") from None
        raise
    read_skips = Counter(ds.skips.counts)  # every rank read the whole table: count these once
    paths, first_rows, _ = unique_first(ds.paths)
    feats, loaded = sharded_image_features(model, ds, first_rows.tolist(), batch_size, rt, num_workers, progress)
    keep = np.flatnonzero(loaded.numpy())
    if keep.size == 0:
        raise DataError(f"{table}: no image could be read ({ds.skips.summary()})")
    labels = [ds.rows[first_rows[i]]["_caption"] for i in keep]
    out = zero_shot(model, tokenizer, feats[torch.as_tensor(keep)], labels, templates, rt, classnames,
                    where=f"{table} column '{class_column}'")
    skipped = Counter(read_skips)
    for c in rt.gather_objects(dict(ds.skips.counts - read_skips)):  # each rank loaded only its share
        skipped.update(c)
    out["skipped"] = dict(sorted(skipped.items()))
    return out
