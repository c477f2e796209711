"""CodeBook validation, safetensors files and the CodeTrie arrays against an independent construction."""
import pytest
import torch
from safetensors.torch import save_file

from gif_kernels import code_beam_search
from gif_kernels.codebook import FILE_FORMAT, FORMAT_VERSION, CodeBook, _checksum
from gif_kernels.tokenize import METHODS


def random_unique_codes(num_ids, length, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randperm(vocab ** length, generator=gen)[:num_ids]
    return torch.stack([(keys // vocab ** (length - 1 - j)) % vocab for j in range(length)], dim=1)


def expected_trie(codes):
    """The trie arrays built from sorted prefixes with plain Python: nodes level by level, each level
    in lexicographic order, edge e leading to node e + 1."""
    rows = [tuple(r) for r in codes.tolist()]
    length = len(rows[0])
    levels = [[()]] + [sorted({r[:d] for r in rows}) for d in range(1, length + 1)]
    node_id, level_starts = {}, []
    for level in levels:
        level_starts.append(len(node_id))
        for prefix in level:
            node_id[prefix] = len(node_id)
    level_starts.append(len(node_id))
    child_offsets, child_tokens = [0], []
    for level in levels:
        for prefix in level:
            children = sorted({r[len(prefix)] for r in rows if r[:len(prefix)] == prefix and len(r) > len(prefix)})
            for token in children:
                assert node_id[prefix + (token,)] == len(child_tokens) + 1
                child_tokens.append(token)
            child_offsets.append(len(child_tokens))
    leaf_ids = [rows.index(prefix) for prefix in levels[-1]]
    return child_offsets, child_tokens, level_starts, leaf_ids


@pytest.mark.parametrize("num_ids,length,vocab", [(1, 1, 2), (1, 3, 5), (7, 1, 7), (37, 6, 2), (101, 3, 5),
                                                  (64, 2, 8), (300, 4, 7)])
def test_trie_matches_independent_construction(num_ids, length, vocab):
    codes = random_unique_codes(num_ids, length, vocab, seed=num_ids)
    trie = CodeBook(codes, vocab).trie()
    offsets, tokens, starts, leaves = expected_trie(codes)
    assert trie.child_offsets.dtype == torch.int64 and trie.child_tokens.dtype == torch.int32
    assert trie.child_offsets.tolist() == offsets
    assert trie.child_tokens.tolist() == tokens
    assert trie.level_starts.tolist() == starts
    assert trie.leaf_ids.tolist() == leaves
    assert trie.length == length and trie.num_nodes == starts[-1]


def test_trie_with_large_vocab_keys_past_int64():
    # vocab**length > 2**63: the trie is built by lexicographic sort instead of integer keys.
    codes = torch.randint(0, 4096, (53, 6), generator=torch.Generator().manual_seed(3))
    book = CodeBook(codes, 4096)
    offsets, tokens, starts, leaves = expected_trie(codes)
    trie = book.trie()
    assert (trie.child_offsets.tolist(), trie.child_tokens.tolist()) == (offsets, tokens)
    assert trie.leaf_ids.tolist() == leaves
    assert torch.equal(book.ids_for(codes), torch.arange(53))


@pytest.mark.parametrize("num_ids,length,vocab", [(1, 1, 2), (101, 3, 5), (300, 4, 7), (4097, 2, 4096)])
def test_ids_for_and_codes_for(num_ids, length, vocab):
    codes = random_unique_codes(num_ids, length, vocab, seed=7) if vocab < 4096 else torch.stack(
        [torch.arange(num_ids) // 4096, torch.arange(num_ids) % 4096], 1)
    book = CodeBook(codes, vocab)
    assert torch.equal(book.ids_for(codes), torch.arange(num_ids))
    labels = torch.randint(0, num_ids, (13,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(book.codes_for(labels), codes[labels])
    assert book.codes_for(labels).dtype == torch.int64
    # codes of no identity, and tokens outside the vocabulary, map to -1
    taken = {tuple(r) for r in codes.tolist()}
    others = [r for r in random_unique_codes(min(vocab ** length, 500), length, vocab, 2).tolist()
              if tuple(r) not in taken][:20] if vocab < 4096 else [[1, 5]]
    others.append([vocab] + [0] * (length - 1))
    assert (book.ids_for(torch.tensor(others)) == -1).all()


def test_codes_for_rejects_bad_labels_on_cpu():
    book = CodeBook(random_unique_codes(10, 2, 4, 0), 4)
    with pytest.raises(ValueError, match="labels: identity 10"):
        book.codes_for(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="labels"):
        book.codes_for(torch.tensor([1.0]))


def test_ids_for_checks_shape():
    book = CodeBook(random_unique_codes(10, 2, 4, 0), 4)
    with pytest.raises(ValueError, match=r"codes: expected shape \(B, 2\)"):
        book.ids_for(torch.zeros(3, 3, dtype=torch.long))


@pytest.mark.parametrize("codes,vocab,match", [
    ([[0, 1], [1, 4]], 4, r"codes: row 1 = \[1, 4\] has a token outside \[0, 4\)"),
    ([[0, 1], [-1, 2]], 4, "codes: row 1"),
    ([[0, 1], [2, 3], [0, 1]], 4, r"codes: row 2 duplicates row 0"),
    ([[0, 1]], 1, "vocab: expected an integer >= 2"),
    ([[0.0, 1.0]], 4, "codes: expected an integer dtype"),
    ([0, 1], 4, r"codes: expected shape \(N, L\)"),
])
def test_invalid_codebooks_name_the_problem(codes, vocab, match):
    with pytest.raises(ValueError, match=match):
        CodeBook(torch.tensor(codes), vocab)


def test_names_length_is_checked():
    with pytest.raises(ValueError, match="names: expected 2 names"):
        CodeBook(torch.tensor([[0], [1]]), 2, names=["only one"])


@pytest.mark.parametrize("names", [None, ["ann", "bo", "émile", "", "名前"]])
def test_save_load_round_trip(tmp_path, names):
    codes = random_unique_codes(5, 3, 6, seed=4)
    book = CodeBook(codes, 6, names)
    path = tmp_path / "codes.safetensors"
    book.save(path)
    loaded = CodeBook.load(path)
    assert torch.equal(loaded.codes, codes) and loaded.vocab == 6 and loaded.names == names
    assert torch.equal(loaded.trie().child_offsets, book.trie().child_offsets)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "codes.safetensors"
    CodeBook(random_unique_codes(50, 3, 6, seed=5), 6).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 17])
    with pytest.raises(ValueError, match="truncated"):
        CodeBook.load(path)


def test_altered_file_is_rejected(tmp_path):
    path = tmp_path / "codes.safetensors"
    CodeBook(random_unique_codes(50, 3, 6, seed=5), 6).save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # a code's bits in the data section
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        CodeBook.load(path)


@pytest.mark.parametrize("codes,match", [([[0, 1], [0, 1]], "duplicates"), ([[0, 1], [0, 9]], "outside")])
def test_file_with_consistent_checksum_is_still_validated(tmp_path, codes, match):
    tensors = {"codes": torch.tensor(codes, dtype=torch.int32)}
    metadata = {"format": FILE_FORMAT, "format_version": str(FORMAT_VERSION), "vocab": "4",
                "sha256": _checksum(tensors)}
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=match):
        CodeBook.load(path)


def test_other_files_are_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a CodeBook"):
        CodeBook.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="path: "):
        CodeBook.load(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_build_from_vectors(method):
    vectors = torch.randn(131, 12, generator=torch.Generator().manual_seed(6))
    book = CodeBook.build(vectors, vocab=4, method=method, seed=1)
    assert (book.num_ids, book.length, book.vocab) == (131, 4, 4)  # 4**4 = 256 >= 131 > 4**3
    assert torch.equal(book.ids_for(book.codes), torch.arange(131))
    # Its trie decodes: scores peaked on each identity's code find that identity, proven exact.
    scores = torch.full((131, 4, 4), -10.0).scatter_(2, book.codes.unsqueeze(2), 0.0)
    ids, _, exact = code_beam_search(scores, book.trie(), beam=4, topk=1)
    assert torch.equal(ids[:, 0], torch.arange(131)) and bool(exact.all())
