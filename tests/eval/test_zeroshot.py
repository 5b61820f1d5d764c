"""Zero-shot classification: hand-checked metrics, label/template parsing, the CLI, and CLIP_benchmark agreement."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import moeclip
from moeclip.data.dataset import CaptionDataset, DataError, load_image
from moeclip.eval.evaluate import evaluate
from moeclip.eval.zeroshot import (classification_metrics, classifier_weights, evaluate_zeroshot, fill,
                                   labels_to_indices, load_classnames, load_templates, zero_shot)
from moeclip.moe import moe_layers
from moeclip.runtime import Runtime

HAVE_CLIP_BENCHMARK = importlib.util.find_spec("clip_benchmark") is not None
needs_cb = pytest.mark.skipif(not HAVE_CLIP_BENCHMARK, reason="clip_benchmark is not installed "
                              "(pip install -e '.[clip-benchmark]')")
CPU = Runtime.local("cpu")


def test_metrics_by_hand():
    # 6 images, 5 classes; rows are logits
    logits = torch.tensor([
        [5., 4, 3, 2, 1],   # truth 0: top1 right
        [5., 4, 3, 2, 1],   # truth 1: top1 wrong, top5 right
        [1., 2, 3, 4, 5],   # truth 4: right
        [1., 2, 3, 4, 5],   # truth 4: right
        [1., 2, 3, 4, 5],   # truth 2: wrong
        [0., 9, 0, 0, 0],   # truth 1: right
    ])
    m = classification_metrics(logits, np.array([0, 1, 4, 4, 2, 1]))
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["top5"] == 1.0
    # recalls: class 0 1/1, class 1 1/2, class 2 0/1, class 4 2/2; class 3 absent -> not counted
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert m["num_classes"] == 5 and m["num_images"] == 6
    assert "top5" not in classification_metrics(logits[:, :4], np.array([0, 1, 3, 3, 2, 1]))


class _Lookup(nn.Module):
    """encode_text returns a fixed vector per prompt string: the classifier can be computed by hand."""

    def __init__(self, vectors: dict[str, list[float]]):
        super().__init__()
        self.texts = list(vectors)
        self.table = torch.tensor(list(vectors.values()))

    def tokenizer(self, texts):
        return torch.tensor([self.texts.index(t) for t in texts])

    def encode_text(self, tok, normalize=False):
        x = self.table[tok]
        return x / x.norm(dim=-1, keepdim=True) if normalize else x


def test_classifier_and_zero_shot_by_hand():
    m = _Lookup({"a cat.": [3., 0], "the cat!": [0., 1], "a dog.": [0., 2], "the dog!": [0., 5]})
    w = classifier_weights(m, m.tokenizer, ["cat", "dog"], ["a {}.", "the {c}!"], CPU)
    # cat: mean of (1,0) and (0,1) normalised = (1,1)/sqrt2; dog: (0,1)
    torch.testing.assert_close(w, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0., 1.]]))
    images = torch.tensor([[1., 0], [0., 1], [0.6, 0.8]])  # -> cat, dog, cat (0.6+0.8)/1.41=0.99 > 0.8
    out = zero_shot(m, m.tokenizer, images, ["cat", "cat", "dog"], ["a {}.", "the {c}!"], CPU)
    assert out["top1"] == pytest.approx(1 / 3)
    assert out["mean_per_class_recall"] == pytest.approx((0.5 + 0) / 2)
    # integer labels index the given class names; the default classes are the sorted labels
    by_index = zero_shot(m, m.tokenizer, images, ["0", "0", "1"], ["a {}.", "the {c}!"], CPU, ["cat", "dog"])
    assert by_index == out


def test_labels_and_templates(tmp_path):
    names = ["tabby cat", "dog", "fish"]
    assert labels_to_indices(["dog", " fish", "tabby cat"], names).tolist() == [1, 2, 0]
    assert labels_to_indices(["2", "0"], names).tolist() == [2, 0]
    with pytest.raises(DataError, match="label 'cow' is not among the 3 class names"):
        labels_to_indices(["dog", "cow"], names, "t.csv")
    with pytest.raises(DataError, match="neither one of the 3 class names"):
        labels_to_indices(["cow"], names)
    with pytest.raises(DataError, match="class index 3 is outside 0..2"):
        labels_to_indices(["1", "3"], names)
    assert fill("a {} photo", "cat") == fill("a {c} photo", "cat") == "a cat photo"

    openai = load_templates("openai")
    assert len(openai) == 80 and openai[0] == "a bad photo of a {c}."
    imagenet = load_classnames("imagenet")
    assert len(imagenet) == 1000 and imagenet[0] == "tench"
    (tmp_path / "t.txt").write_text("a photo of a {}.\n\nart of the {c}\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "art of the {c}"]
    (tmp_path / "bad.txt").write_text("a photo of a {}.\nno slot here\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: template 'no slot here' has no \{\} or \{c\}"):
        load_templates(str(tmp_path / "bad.txt"))
    (tmp_path / "dup.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match="'cat' appears more than once"):
        load_classnames(str(tmp_path / "dup.txt"))
    with pytest.raises(FileNotFoundError, match="no such templates file"):
        load_templates(str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def moe_model():
    """The shipped small trained CLIP upcycled, experts perturbed so routing matters: its predictions differ per
    image (a random-weight micro CLIP puts every image in one class, which would make the comparisons trivial)."""
    model, preprocess, tokenizer = moeclip.load(Path(__file__).resolve().parents[2] / "checkpoints" / "base-tiny")
    moeclip.upcycle(model, None, num_experts=3, top_k=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, layer in moe_layers(model):
            layer.router.proj.weight.copy_(torch.randn(layer.router.proj.weight.shape, generator=g))
            for expert in layer.experts:
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), preprocess, tokenizer


@pytest.fixture(scope="module")
def shape_table(corpus, tmp_path_factory):
    """filepath + class (the synthetic shape, 6 classes), no caption column; names in a file, unsorted."""
    out = tmp_path_factory.mktemp("zs")
    rows = [r for r in csv.DictReader(open(corpus["val"]))]
    root = corpus["val"].parent
    with open(out / "shapes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "label"])
        for r in rows:
            w.writerow([str(root / r["filepath"]), r["shape"]])
    names = ["square", "circle", "triangle", "ring", "diamond", "cross"]
    (out / "names.txt").write_text("\n".join(names) + "\n")
    (out / "templates.txt").write_text("a photo of a {c}.\na drawing of the {c}\nsomething {c}-like\n")
    return out / "shapes.csv", names, [r["shape"] for r in rows]


def test_evaluate_zeroshot_matches_evaluate_class_column(moe_model, shape_table, corpus):
    model, preprocess, tokenizer = moe_model
    table, names, _ = shape_table
    templates = load_templates(str(table.parent / "templates.txt"))
    zs = evaluate_zeroshot(model, preprocess, tokenizer, table, "label", names, templates, runtime=CPU,
                           progress=False)
    full = evaluate(model, preprocess, tokenizer, corpus["val"], class_column="shape", classnames=names,
                    templates=templates, runtime=CPU, progress=False)
    for k in ("top1", "top5", "mean_per_class_recall", "num_classes", "num_images"):
        assert zs[k] == pytest.approx(full["zeroshot"][k]), k
    assert zs["num_classes"] == 6 and zs["num_images"] == 64
    with pytest.raises(DataError, match="needs a 'filepath' column and the class column 'shape'.*found"):
        evaluate_zeroshot(model, preprocess, tokenizer, table, "shape", names, templates, runtime=CPU, progress=False)
    captions = table.parent / "captions.json"
    captions.write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "gpt", "value": "a cat"}]}]))
    with pytest.raises(DataError, match="reads a CSV/TSV .* not a sharegpt4v caption file"):
        evaluate_zeroshot(model, preprocess, tokenizer, captions, "label", names, templates, runtime=CPU)


def test_cli_zeroshot(moe_model, shape_table, tmp_path, capsys, micro_dir):
    from moeclip.cli import main
    table, _, _ = shape_table
    out = tmp_path / "m.json"
    rc = main(["eval", "--task", "zeroshot", "--model", str(micro_dir), "--data", str(table), "--class-column",
               "label", "--classnames", str(table.parent / "names.txt"), "--templates", "openai",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "zero-shot top1 (6 classes)" in printed and "mean_per_class_recall" in printed
    m = json.loads(out.read_text())
    assert m["num_images"] == 64 and 0 <= m["top1"] <= 1
    assert main(["eval", "--task", "zeroshot", "--model", str(micro_dir), "--data", str(table)]) == 2
    assert "needs --class-column" in capsys.readouterr().err
    rc = main(["eval", "--task", "zeroshot", "--model", str(micro_dir), "--data", str(table), "--class-column",
               "label", "--classnames", "imagenet", "--device", "cpu"])
    assert rc == 2 and "is neither one of the 1000 class names" in capsys.readouterr().err


class _Images(torch.utils.data.Dataset):
    """CLIP_benchmark's classification datasets yield (image, class index) and have `.classes`."""

    def __init__(self, paths, targets, transform, classes):
        self.paths, self.targets, self.transform, self.classes = paths, targets, transform, classes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_image(self.paths[i])), self.targets[i]


def _accuracy_numpy2(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy` with `float(array of shape (1,))`, an error under numpy >= 2.4, replaced
    by `.item()`; otherwise the same computation."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


@needs_cb
def test_equals_clip_benchmark(moe_model, shape_table, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy_numpy2)
    model, preprocess, tokenizer = moe_model
    table, names, labels = shape_table
    templates = load_templates(str(table.parent / "templates.txt"))
    ds = CaptionDataset(table, caption_key="label")
    targets = [names.index(x) for x in labels]
    loader = torch.utils.data.DataLoader(_Images([r["_path"] for r in ds.rows], targets, preprocess, names),
                                         batch_size=16)
    cb = zeroshot_classification.evaluate(model, loader, tokenizer, names, templates, device="cpu", amp=False)
    ours = evaluate_zeroshot(model, preprocess, tokenizer, table, "label", names, templates, runtime=CPU,
                             progress=False)
    assert ours["top1"] == pytest.approx(cb["acc1"])
    assert ours["top5"] == pytest.approx(cb["acc5"])
    assert ours["mean_per_class_recall"] == pytest.approx(cb["mean_per_class_recall"])
    assert cb["mean_per_class_recall"] > 1 / 6  # not one class predicted for every image


TWO_RANK_TEMPLATES = ["a photo of a {c}.", "a drawing of the {}", "something {c}-like", "a {} at the center"]


def _rank(rank: int, port: int, model_dir: str, table: str, names: list, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, pre, tok = moeclip.load(model_dir)
        rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=2)
        m = evaluate_zeroshot(model, pre, tok, table, "label", names, TWO_RANK_TEMPLATES, batch_size=8, runtime=rt,
                              progress=False)
        torch.save(m, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(moe_model, shape_table, tmp_path):
    """Images and prompts are sharded over the ranks and gathered: both ranks report the one-process metrics,
    and an unreadable image is counted once."""
    import socket

    import torch.multiprocessing as mp
    table, names, _ = shape_table
    model, pre, tok = moe_model
    model_dir = moeclip.save_model_dir(model, tmp_path / "moe")
    with_bad = tmp_path / "t.csv"
    with_bad.write_text(table.read_text() + f"{tmp_path / 'missing.png'},circle\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(model_dir), str(with_bad), names, str(tmp_path / "m")), nprocs=2)
    one = evaluate_zeroshot(model, pre, tok, with_bad, "label", names, TWO_RANK_TEMPLATES, batch_size=8,
                            runtime=CPU, progress=False)
    assert sum(one["skipped"].values()) == 1 and one["num_images"] == 64
    assert one["mean_per_class_recall"] > 1 / 6  # not one class predicted for every image
    for rank in (0, 1):
        got = torch.load(tmp_path / f"m.{rank}")
        assert got.pop("skipped") == one["skipped"]
        assert got == pytest.approx({k: v for k, v in one.items() if k != "skipped"})
