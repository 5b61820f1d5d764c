"""moeclip models through LAION's CLIP_benchmark: the loader contract, and its own metrics on our model."""
import importlib.util

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


@needs_cb
def test_clip_benchmark_retrieval_equals_moeclip_eval(moe_model_dir, corpus, tmp_path):
    import clip_benchmark.models as cb_models
    from clip_benchmark.metrics import zeroshot_retrieval

    from moeclip.eval.clip_benchmark import register
    from moeclip.eval.evaluate import evaluate

    register()
    assert "moeclip" in cb_models.MODEL_TYPES
    model, transform, tokenizer = cb_models.load_clip(model_type="moeclip", model_name=str(moe_model_dir),
                                                      pretrained="laion400m_e32", cache_dir=None, device="cpu")
    seen, rows = set(), []
    for r in CaptionDataset(corpus["val"]).rows:  # unique captions: CLIP_benchmark has no shared positives
        if r["_caption"] not in seen:
            seen.add(r["_caption"])
            rows.append(r)
    rows = rows[:40]
    loader = torch.utils.data.DataLoader(_Pairs(rows, transform), batch_size=16,
                                         collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b]))
    cb = zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5])
    table = tmp_path / "rows.csv"
    table.write_text("filepath,title\n" + "".join(f"{r['_path']},{r['_caption']}\n" for r in rows))
    ours = evaluate(model, transform, tokenizer, table, progress=False)
    for k in (1, 5):
        assert cb[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text_to_image_R@{k}"])
        assert cb[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"image_to_text_R@{k}"])

