"""CLIP-MoE release files (the authors' OpenAI-CLIP layout): a small random file built from the documented keys
loads into moeclip, encodes exactly what a plain-torch reading of that layout computes, exports back unchanged,
and bad files fail naming the key. The reference below is written from the layout description, not from moeclip."""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from moeclip import load, save_model_dir
from moeclip.cli import main
from moeclip.model.clip_moe_layout import export_clip_moe
from moeclip.moe import moe_layers

E, CTX, VOCAB, EMBED, PATCH, IMAGE = 4, 248, 49408, 96, 8, 32
TOWERS = {"visual": dict(prefix="visual.transformer.resblocks", width=128, layers=3),
          "text": dict(prefix="transformer.resblocks", width=192, layers=3)}


def make_state(moe_visual: int = 2, moe_text: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint in the authors' layout; MoE in the last `moe_*` blocks of each tower."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def ln(prefix, d):
        return {f"{prefix}.weight": 1 + rnd(d, std=0.1), f"{prefix}.bias": rnd(d, std=0.1)}

    def ffn(prefix, d):
        return {f"{prefix}.c_fc.weight": rnd(4 * d, d, std=d ** -0.5), f"{prefix}.c_fc.bias": rnd(4 * d, std=0.1),
                f"{prefix}.c_proj.weight": rnd(d, 4 * d, std=(4 * d) ** -0.5), f"{prefix}.c_proj.bias": rnd(d, std=0.1)}

    dv, dt, grid = TOWERS["visual"]["width"], TOWERS["text"]["width"], IMAGE // PATCH
    sd = {"visual.conv1.weight": rnd(dv, 3, PATCH, PATCH, std=0.1), "visual.class_embedding": rnd(dv, std=0.5),
          "visual.positional_embedding": rnd(grid * grid + 1, dv, std=0.5), "visual.proj": rnd(dv, EMBED, std=0.1),
          **ln("visual.ln_pre", dv), **ln("visual.ln_post", dv),
          "token_embedding.weight": rnd(VOCAB, dt, std=0.5), "positional_embedding": rnd(CTX, dt, std=0.5),
          "positional_embedding_res": rnd(CTX, dt, std=0.5), **ln("ln_final", dt),
          "text_projection": rnd(dt, EMBED, std=0.1), "logit_scale": torch.tensor(math.log(1 / 0.07))}
    for tower, n_moe in (("visual", moe_visual), ("text", moe_text)):
        t = TOWERS[tower]
        d = t["width"]
        for i in range(t["layers"]):
            p = f"{t['prefix']}.{i}"
            sd |= {f"{p}.attn.in_proj_weight": rnd(3 * d, d, std=d ** -0.5), f"{p}.attn.in_proj_bias": rnd(3 * d),
                   f"{p}.attn.out_proj.weight": rnd(d, d, std=d ** -0.5), f"{p}.attn.out_proj.bias": rnd(d),
                   **ln(f"{p}.ln_1", d), **ln(f"{p}.ln_2", d)}
            if i >= t["layers"] - n_moe:
                sd[f"{p}.gate.weight"] = rnd(E, d, std=0.3)
                for e in range(E):
                    sd |= ffn(f"{p}.experts.{e}", d)
            else:
                sd |= ffn(f"{p}.mlp", d)
    return sd


# ------------------------------------------------------------------ the reference, from the layout description

def _ln(x, sd, k):
    return F.layer_norm(x, x.shape[-1:], sd[f"{k}.weight"], sd[f"{k}.bias"], eps=1e-5)


def _ffn(x, sd, p):
    h = x @ sd[f"{p}.c_fc.weight"].T + sd[f"{p}.c_fc.bias"]
    return (h * torch.sigmoid(1.702 * h)) @ sd[f"{p}.c_proj.weight"].T + sd[f"{p}.c_proj.bias"]  # QuickGELU


def _attention(x, sd, p, causal):
    b, n, d = x.shape
    heads = d // 64
    q, k, v = (x @ sd[f"{p}.in_proj_weight"].T + sd[f"{p}.in_proj_bias"]).split(d, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return out @ sd[f"{p}.out_proj.weight"].T + sd[f"{p}.out_proj.bias"]


def _moe(x, sd, p, top_k):
    tokens = x.reshape(-1, x.shape[-1])
    probs = (tokens.float() @ sd[f"{p}.gate.weight"].float().T).softmax(-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    weights = top_p / top_p.sum(-1, keepdim=True)
    every = torch.stack([_ffn(tokens, sd, f"{p}.experts.{e}") for e in range(E)])  # [E, T, d]
    rows = torch.arange(tokens.shape[0])
    out = sum(weights[:, s, None] * every[top_i[:, s], rows] for s in range(top_k))
    return out.reshape(x.shape), top_i


def _tower(x, sd, tower, causal, top_k, chosen):
    t = TOWERS[tower]
    for i in range(t["layers"]):
        p = f"{t['prefix']}.{i}"
        x = x + _attention(_ln(x, sd, f"{p}.ln_1"), sd, f"{p}.attn", causal)
        h = _ln(x, sd, f"{p}.ln_2")
        if f"{p}.gate.weight" in sd:
            y, picked = _moe(h, sd, p, top_k)
            chosen.append(picked)
            x = x + y
        else:
            x = x + _ffn(h, sd, f"{p}.mlp")
    return x


def reference_image(sd, img, top_k=2, chosen=None):
    x = F.conv2d(img, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = _ln(torch.cat([cls, x], 1) + sd["visual.positional_embedding"], sd, "visual.ln_pre")
    x = _tower(x, sd, "visual", False, top_k, [] if chosen is None else chosen)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def reference_text(sd, text, top_k=2, chosen=None):
    m1 = torch.zeros(CTX, 1)
    m1[:20] = 1
    x = sd["token_embedding.weight"][text] + sd["positional_embedding"] * m1 + sd["positional_embedding_res"] * (1 - m1)
    x = _ln(_tower(x, sd, "text", True, top_k, [] if chosen is None else chosen), sd, "ln_final")
    return x[torch.arange(x.shape[0]), text.argmax(-1)] @ sd["text_projection"]


LONG = ("a photo of a small red bicycle leaning against a weathered blue wooden fence on a quiet street " * 8).strip()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("clipmoe") / "clip-moe-4-2-tiny.pt"
    torch.save(make_state(), path)
    return path


def _inputs(tokenizer):
    torch.manual_seed(1)
    return torch.randn(2, 3, IMAGE, IMAGE), tokenizer([LONG, "a cat"])


@pytest.mark.parametrize("moe_visual,moe_text", [(2, 2), (1, 3)])
@pytest.mark.parametrize("top_k", [2, 1])
def test_encodings_match_the_layout_reference(tmp_path, moe_visual, moe_text, top_k):
    sd = make_state(moe_visual, moe_text)
    torch.save(sd, tmp_path / "m.pt")
    model, preprocess, tokenizer = load(tmp_path / "m.pt", top_k=top_k)
    img, text = _inputs(tokenizer)
    assert text.shape == (2, CTX) and text[0].argmax() > 77  # the long caption uses positions past 77
    assert model.visual.image_size == (IMAGE, IMAGE) and model.moeclip_arch["model_cfg"]["quick_gelu"] is True
    assert [(t, i) for t, i, _ in moe_layers(model)] == [("visual", i) for i in range(3 - moe_visual, 3)] + \
        [("text", i) for i in range(3 - moe_text, 3)]
    assert torch.equal(model.positional_embedding[:20], sd["positional_embedding"][:20])
    assert torch.equal(model.positional_embedding[20:], sd["positional_embedding_res"][20:])
    chosen = []
    with torch.no_grad():
        ref_img, ref_txt = reference_image(sd, img, top_k, chosen), reference_text(sd, text, top_k, chosen)
        got_img, got_txt = model.encode_image(img), model.encode_text(text)
    torch.testing.assert_close(got_img, ref_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_txt, ref_txt, rtol=1e-4, atol=1e-5)
    picked = [layer.last_routing.experts for _, _, layer in moe_layers(model)]
    assert all(torch.equal(a, b.reshape(a.shape)) for a, b in zip(picked, chosen))  # same experts, same order
    assert all(len(p.unique()) > 1 for p in picked)  # the routing really varies between tokens


def test_export_round_trips_exactly(ckpt, tmp_path):
    model, _, tokenizer = load(ckpt)
    export_clip_moe(model, tmp_path / "out.pt")
    original = torch.load(ckpt, weights_only=True)
    exported = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(exported) == set(original)
    for k, v in original.items():
        if not k.startswith("positional_embedding"):
            assert torch.equal(exported[k], v), k
    assert torch.equal(exported["positional_embedding"], model.positional_embedding.detach())
    back, _, _ = load(tmp_path / "out.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    img, text = _inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(reference_text(exported, text), reference_text(original, text))  # the masks pick the rows
        assert torch.equal(model.encode_text(text), back.encode_text(text))
    assert not list(tmp_path.glob(".out.pt.*"))  # written through a temporary file


def test_cli_convert_info_export(ckpt, tmp_path, capsys):
    assert main(["convert", str(ckpt), str(tmp_path / "dir"), "--top-k", "2"]) == 0
    assert main(["info", str(tmp_path / "dir")]) == 0
    out = capsys.readouterr().out
    assert "clip-moe" in out and "4 MoE layers" in out and "text block 2: 4 experts, top-2" in out
    assert main(["export", "--format", "clip-moe", str(tmp_path / "dir"), str(tmp_path / "again.pt")]) == 0
    a, b = torch.load(ckpt, weights_only=True), torch.load(tmp_path / "again.pt", weights_only=True)
    assert set(a) == set(b) and torch.equal(a["transformer.resblocks.2.gate.weight"],
                                            b["transformer.resblocks.2.gate.weight"])
    direct, _, tok = load(ckpt)
    converted, _, _ = load(tmp_path / "dir")
    img, text = _inputs(tok)
    with torch.no_grad():
        assert torch.equal(direct.encode_image(img), converted.encode_image(img))
        assert torch.equal(direct.encode_text(text), converted.encode_text(text))


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.__setitem__("transformer.resblocks.2.experts.1.c_fc.weight", torch.zeros(3, 192)),
     "'transformer.resblocks.2.experts.1.c_fc.weight' has shape"),
    (lambda sd: sd.pop("visual.transformer.resblocks.1.experts.3.c_proj.bias"),
     "no 'visual.transformer.resblocks.1.experts.3.c_proj.bias'"),
    (lambda sd: sd.__setitem__("visual.transformer.resblocks.0.mlp.extra", torch.zeros(1)),
     "unexpected key 'visual.transformer.resblocks.0.mlp.extra'"),
    (lambda sd: sd.__setitem__("transformer.resblocks.1.gate.weight", torch.zeros(3, 192)),
     "'transformer.resblocks.1.gate.weight' has 3"),
    (lambda sd: sd.pop("positional_embedding_res"), "no 'positional_embedding_res'"),
    (lambda sd: [sd.pop(k) for k in list(sd) if ".gate." in k], "no '...resblocks.N.gate.weight'"),
    (lambda sd: sd.__setitem__("visual.positional_embedding", torch.zeros(18, 128)),
     "'visual.positional_embedding' has 18 rows"),
])
def test_bad_files_name_the_key(tmp_path, edit, message):
    sd = make_state()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt") as err:
        load(tmp_path / "bad.pt")
    assert message in str(err.value)


def test_cli_errors_are_one_line(tmp_path, capsys):
    sd = make_state()
    sd["ln_final.weight"] = torch.ones(100)
    torch.save(sd, tmp_path / "bad.pt")
    assert main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "out")]) == 2
    assert "'ln_final.weight' gives width 100" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_top_k_is_checked(ckpt, micro_dir):
    model, _, _ = load(ckpt, top_k=3)
    assert {layer.top_k for _, _, layer in moe_layers(model)} == {3}
    with pytest.raises(ValueError, match="top_k=5 but the file has 4 experts"):
        load(ckpt, top_k=5)
    with pytest.raises(ValueError, match="top_k applies to a CLIP-MoE checkpoint file"):
        load(micro_dir, top_k=2)


def test_code_in_the_file_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"visual.conv1.weight": Payload()}, f)
    with pytest.raises(ValueError, match="evil.pt"):
        load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_export_refuses_models_outside_the_family(ckpt, micro_dir, tmp_path):
    from moeclip.model.clip_moe_layout import build_from_spec, infer_spec, read_state
    dense, _, _ = load(micro_dir)
    with pytest.raises(ValueError, match="nn.GELU"):
        export_clip_moe(dense, tmp_path / "x.pt")
    spec = infer_spec(read_state(ckpt))
    spec.moe_layers = {"visual": [0], "text": [0]}
    with pytest.raises(ValueError, match="last blocks"):
        export_clip_moe(build_from_spec(spec), tmp_path / "x.pt")
    spec.moe_layers = {"visual": [1, 2], "text": [2]}
    with pytest.raises(ValueError, match=r"min\(M, layers\)"):
        export_clip_moe(build_from_spec(spec), tmp_path / "x.pt")
    model, _, _ = load(ckpt)
    model.moeclip_arch["model_cfg"]["text_cfg"]["heads"] = 1
    with pytest.raises(ValueError, match="text_cfg.heads is 1"):
        export_clip_moe(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
