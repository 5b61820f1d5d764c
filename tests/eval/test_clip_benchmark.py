"""moeclip models through LAION's CLIP_benchmark: the loader contract, and its own metrics on our model."""
import importlib.util
import json
import shutil

import pytest
import torch

import moeclip
from moeclip.data.dataset import CaptionDataset, load_image
from moeclip.eval.clip_benchmark import load_clip
from moeclip.moe import moe_layers

HAVE_CLIP_BENCHMARK = importlib.util.find_spec("clip_benchmark") is not None
needs_cb = pytest.mark.skipif(not HAVE_CLIP_BENCHMARK, reason="clip_benchmark is not installed "
                              "(pip install -e '.[clip-benchmark]')")


@pytest.fixture(scope="module")
def moe_model_dir(micro_dir, tmp_path_factory):
    model, _, _ = moeclip.load(micro_dir)
    moeclip.upcycle(model, None, num_experts=3, top_k=2, router_init_std=1.0)
    return moeclip.save_model_dir(model, tmp_path_factory.mktemp("cbmoe") / "model")


def test_loader_contract_and_moe_forward(moe_model_dir, corpus):
    model, transform, tokenizer = load_clip("moeclip", str(moe_model_dir), "none", None, "cpu")
    assert not model.training and len(moe_layers(model)) == 4
    image = transform(load_image(CaptionDataset(corpus["val"]).rows[0]["_path"]))
    assert image.shape == (3, 32, 32)
    text = tokenizer(["a red circle", "a blue square"])
    assert text.dtype == torch.long and text.shape == (2, 20)
    images = torch.stack([image, image.flip(-1)])
    image_features, text_features, logit_scale = model(images, text)  # the open_clip forward works on an MoE
    assert image_features.shape == text_features.shape == (2, 32)
    for feats in (model.encode_image(images, normalize=True), model.encode_text(text, normalize=True)):
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    assert moe_layers(model)[-1][2].last_mask.sum() == int((text != 0).sum())  # text routing saw the padding mask
    with pytest.raises(ValueError, match="model_name is empty"):
        load_clip("moeclip", "", None, None, "cpu")


class _Pairs(torch.utils.data.Dataset):
    """CLIP_benchmark's retrieval datasets yield (image tensor, [captions])."""

    def __init__(self, rows, transform):
        self.rows, self.transform = rows, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.transform(load_image(self.rows[i]["_path"])), [self.rows[i]["_caption"]]


def _hits(recall: float, queries: int) -> int:
    """A recall as a count of queries hit: equal counts are exactly equal recalls."""
    return round(recall * queries)


@needs_cb
def test_clip_benchmark_retrieval_equals_moeclip_eval(moe_model_dir, corpus, tmp_path):
    """A CSV whose caption strings repeat across images (as synthetic corpora's do): per_caption = CLIP_benchmark."""
    import clip_benchmark.models as cb_models
    from clip_benchmark.metrics import zeroshot_retrieval

    from moeclip.eval.clip_benchmark import register
    from moeclip.eval.evaluate import evaluate

    register()
    assert "moeclip" in cb_models.MODEL_TYPES
    model, transform, tokenizer = cb_models.load_clip(model_type="moeclip", model_name=str(moe_model_dir),
                                                      pretrained="laion400m_e32", cache_dir=None, device="cpu")
    rows = CaptionDataset(corpus["val"]).rows[:40]
    rows = [{**r, "_caption": rows[i - i % 2]["_caption"]} for i, r in enumerate(rows)]  # pairs share a caption
    loader = torch.utils.data.DataLoader(_Pairs(rows, transform), batch_size=16,
                                         collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b]))
    cb = zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5])
    table = tmp_path / "rows.csv"
    table.write_text("filepath,title\n" + "".join(f"{r['_path']},{r['_caption']}\n" for r in rows))
    ours = evaluate(model, transform, tokenizer, table, progress=False)
    assert ours["protocol"] == "per_caption"
    for k in (1, 5):
        assert _hits(cb[f"image_retrieval_recall@{k}"], 40) == _hits(ours[f"text_to_image_R@{k}"], 40)
        assert _hits(cb[f"text_retrieval_recall@{k}"], 40) == _hits(ours[f"image_to_text_R@{k}"], 40)


def _coco_test_split(corpus, root, n=30):
    """The same n images and captions as a Karpathy JSON (what `moeclip eval` reads) and as the COCO-format
    annotation CLIP_benchmark's `mscoco_captions` reads. Each image has its own caption plus its neighbour's,
    so every image shares a caption string with another one."""
    rows = CaptionDataset(corpus["val"]).rows[:n]
    (root / "val2014").mkdir(parents=True)
    karpathy, images, annotations = [], [], []
    for i, r in enumerate(rows):
        name = f"COCO_val2014_{i:012d}.png"
        shutil.copy(r["_path"], root / "val2014" / name)
        sentences = [r["_caption"], rows[(i + 1) % n]["_caption"]]
        karpathy.append({"filepath": "val2014", "filename": name, "imgid": i, "split": "test",
                         "sentences": [{"raw": s} for s in sentences]})
        images.append({"id": i, "file_name": name})
        annotations += [{"id": 2 * i + j, "image_id": i, "caption": s} for j, s in enumerate(sentences)]
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))
    (root / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "dataset_coco.json", root / "coco_test_karpathy.json", 2 * n


@needs_cb
def test_moeclip_eval_on_karpathy_json_equals_clip_benchmark_mscoco(moe_model_dir, corpus, tmp_path):
    """`moeclip eval` on a Karpathy JSON with captions repeated across images gives CLIP_benchmark's
    `zeroshot_retrieval` recalls on the same images and captions read by its own `mscoco_captions` loader."""
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval

    from moeclip.cli import main

    karpathy, coco_ann, num_captions = _coco_test_split(corpus, tmp_path / "coco")
    model, transform, tokenizer = load_clip("moeclip", str(moe_model_dir), "none", None, "cpu")
    ds = build_dataset("mscoco_captions", root=str(tmp_path / "coco"), transform=transform, split="test",
                       download=False, annotation_file=str(coco_ann), task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=get_dataset_collate_fn("mscoco_captions"))
    cb = zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    out = tmp_path / "m.json"
    assert main(["eval", "--model", str(moe_model_dir), "--data", str(karpathy), "--device", "cpu",
                 "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    assert ours["protocol"] == "per_caption" and ours["num_rows"] == num_captions
    assert ours["num_captions"] < num_captions  # the strings do repeat
    for k in (1, 5, 10):
        assert _hits(cb[f"image_retrieval_recall@{k}"], num_captions) == _hits(ours[f"text_to_image_R@{k}"],
                                                                              num_captions), k
        assert _hits(cb[f"text_retrieval_recall@{k}"], 30) == _hits(ours[f"image_to_text_R@{k}"], 30), k
    # the merged protocol is another number on the same data: the reason per_caption is the default
    assert main(["eval", "--model", str(moe_model_dir), "--data", str(karpathy), "--device", "cpu",
                 "--protocol", "multi_positive", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["protocol"] == "multi_positive"
    assert any(merged[k] != ours[k] for k in ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1"))
