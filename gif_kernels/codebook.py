"""CodeBook, the table of identity codes, and CodeTrie, the trie of valid codes the decoder walks.

Trie format (docs/DESIGN.md): nodes are numbered level by level (root = 0), each level in lexicographic
order of prefixes. Node u's children are the edges e in [child_offsets[u], child_offsets[u+1]), tokens
ascending in child_tokens[e]; edge e leads to node e + 1. level_starts (L+2,) holds the first node of
each depth and then the node count M; leaf_ids[u - level_starts[L]] is the identity of leaf u.
"""
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open

from .files import save_safetensors
from .tokenize import DEFAULT_METHOD, tokenize

FILE_FORMAT = "gif-kernels CodeBook"
FORMAT_VERSION = 1


_ARRAYS = (("child_offsets", torch.int64), ("child_tokens", torch.int32), ("level_starts", torch.int64),
           ("leaf_ids", torch.int64))


@dataclass(frozen=True)
class CodeTrie:
    """The trie's arrays, checked when it is made (a hand-made or loaded trie with a bad offset, an
    unsorted or out-of-range token or a leaf id that is no identity's raises ValueError), so that
    searches can trust them. An in-place change of an array through PyTorch is seen by its version
    counter, and the next search checks the trie again (check_unchanged)."""
    child_offsets: torch.Tensor  # int64 (M + 1,)
    child_tokens: torch.Tensor   # int32 (M - 1,)
    level_starts: torch.Tensor   # int64 (L + 2,)
    leaf_ids: torch.Tensor       # int64 (number of leaves,)
    vocab: int

    def __post_init__(self):
        self._check()

    def _versions(self):
        return tuple(getattr(self, name)._version for name, _ in _ARRAYS)

    def _check(self):
        _check_trie(self)
        object.__setattr__(self, "_checked_versions", self._versions())

    def check_unchanged(self) -> None:
        """Check the arrays again if any was changed in place since they were checked."""
        if self._versions() != self._checked_versions:
            self._check()

    @property
    def length(self) -> int:
        return self.level_starts.numel() - 2

    @property
    def num_nodes(self) -> int:
        return self.child_offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.child_offsets.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.child_offsets, self.child_tokens, self.level_starts, self.leaf_ids))

    def to(self, device) -> "CodeTrie":
        self.check_unchanged()
        moved = object.__new__(CodeTrie)  # copies of checked arrays: no second check (and no device sync)
        for name, _ in _ARRAYS:
            object.__setattr__(moved, name, getattr(self, name).to(device))
        object.__setattr__(moved, "vocab", self.vocab)
        object.__setattr__(moved, "_checked_versions", moved._versions())
        return moved

    def codes(self) -> torch.Tensor:
        """The code of each identity (N, L) int64, row i for identity i: each leaf's tokens, read by
        walking up to the root."""
        degrees = self.child_offsets[1:] - self.child_offsets[:-1]
        parent = torch.repeat_interleave(torch.arange(self.num_nodes, device=self.device), degrees)
        node = torch.arange(int(self.level_starts[self.length]), self.num_nodes, device=self.device)
        leaf_codes = torch.empty(node.numel(), self.length, dtype=torch.int64, device=self.device)
        for level in reversed(range(self.length)):
            leaf_codes[:, level] = self.child_tokens[node - 1]  # node u is reached by edge u - 1
            node = parent[node - 1]
        codes = torch.empty_like(leaf_codes)
        codes[self.leaf_ids] = leaf_codes
        return codes

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Identity of each code row (B, L) -> (B,) int64, -1 where the code is not in the trie.

        A batched binary search among each node's children per level: no host sync."""
        codes = codes.to(self.device, torch.int64)
        node = torch.zeros(codes.shape[0], dtype=torch.int64, device=self.device)
        found = torch.ones_like(node, dtype=torch.bool)
        last_edge = max(self.child_tokens.numel() - 1, 0)
        for level in range(self.length):
            token = codes[:, level]
            lo, hi = self.child_offsets[node], self.child_offsets[node + 1]
            end = hi
            for _ in range(max(1, math.ceil(math.log2(self.vocab + 1)))):
                mid = (lo + hi) // 2
                go_right = (lo < hi) & (self.child_tokens[mid.clamp(max=last_edge)] < token)
                lo, hi = torch.where(go_right, mid + 1, lo), torch.where(go_right, hi, mid)
            edge = lo.clamp(max=last_edge)
            found &= (lo < end) & (self.child_tokens[edge] == token)
            node = torch.where(found, edge + 1, 0)
        leaf = (node - self.level_starts[self.length]).clamp(min=0)
        return torch.where(found, self.leaf_ids[leaf], -1)


def _check_trie(trie: CodeTrie) -> None:
    """The trie format of docs/DESIGN.md, read on the CPU (O(M) numpy)."""
    if isinstance(trie.vocab, bool) or not isinstance(trie.vocab, (int, np.integer)) or trie.vocab < 1:
        raise ValueError(f"vocab: expected an integer >= 1, got {trie.vocab!r}")
    arrays = {}
    for name, dtype in _ARRAYS:
        array = getattr(trie, name)
        if not isinstance(array, torch.Tensor) or array.dim() != 1 or array.dtype != dtype:
            got = f"{array.dtype} {tuple(array.shape)}" if isinstance(array, torch.Tensor) else type(array)
            raise ValueError(f"{name}: expected a 1-D {dtype} tensor, got {got}")
        if array.device != trie.child_offsets.device:
            raise ValueError(f"{name}: expected device {trie.child_offsets.device}, got {array.device}")
        arrays[name] = array.cpu().numpy()
    offsets, tokens, starts, leaves = (arrays[name] for name, _ in _ARRAYS)
    num_nodes = offsets.size - 1
    if num_nodes < 2 or tokens.size != num_nodes - 1:
        raise ValueError(f"child_tokens: expected M - 1 tokens for the M = {num_nodes} nodes of child_offsets "
                         f"(M >= 2), got {tokens.size}")
    if starts.size < 3 or starts[0] != 0 or starts[1] != 1 or starts[-1] != num_nodes or np.any(np.diff(starts) < 1):
        raise ValueError(f"level_starts: expected 0, 1, increasing first nodes of each level, then M = {num_nodes}; "
                         f"got {starts.tolist()[:8]}")
    degrees = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != tokens.size or np.any(degrees < 0):
        raise ValueError(f"child_offsets: expected offsets from 0 to {tokens.size} that never decrease")
    length = starts.size - 2
    # Level d's children are level d + 1 (edge e leads to node e + 1), and only leaves have no children.
    if np.any(offsets[starts[1:length + 1]] + 1 != starts[2:]) or np.any(degrees[:starts[length]] == 0) \
            or np.any(degrees[starts[length]:] != 0):
        raise ValueError("child_offsets: expected the children of each level to be the next level, every node "
                         f"above depth L = {length} to have children and the leaves none")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= trie.vocab):
        raise ValueError(f"child_tokens: expected tokens in [0, vocab) = [0, {trie.vocab})")
    siblings = np.repeat(np.arange(num_nodes), degrees)
    if np.any((siblings[1:] == siblings[:-1]) & (tokens[1:] <= tokens[:-1])):
        raise ValueError("child_tokens: expected each node's children in strictly ascending token order")
    num_leaves = num_nodes - starts[length]
    if leaves.size != num_leaves or not np.array_equal(np.sort(leaves), np.arange(num_leaves)):
        raise ValueError(f"leaf_ids: expected a permutation of [0, N) = [0, {num_leaves}) (one identity per "
                         f"leaf), got {leaves.size} ids")


def _lexicographic_order(codes: np.ndarray, vocab: int) -> np.ndarray:
    length = codes.shape[1]
    if length * math.log2(vocab) < 63:  # one int64 key per code: a single sort
        keys = np.zeros(codes.shape[0], dtype=np.int64)
        for column in codes.T:
            keys = keys * vocab + column
        return np.argsort(keys, kind="stable")
    return np.lexsort(codes.T[::-1])


def _first_duplicate(sorted_codes: np.ndarray, order: np.ndarray):
    """(row, earlier row) of the lowest-numbered row whose code repeats an earlier row's, or None."""
    same = np.flatnonzero((sorted_codes[1:] == sorted_codes[:-1]).all(axis=1))
    if same.size == 0:
        return None
    later = np.maximum(order[same], order[same + 1])
    pick = np.argmin(later)
    return int(later[pick]), int(np.minimum(order[same], order[same + 1])[pick])


def _build_trie(sorted_codes: np.ndarray, order: np.ndarray, vocab: int) -> CodeTrie:
    num_rows, length = sorted_codes.shape
    starts_new = np.zeros(num_rows, dtype=bool)  # row begins a prefix not seen in the previous row
    node_of_row = np.zeros(num_rows, dtype=np.int64)  # each row's node at the current depth
    level_starts, tokens, parents = [0, 1], [], []
    for level in range(length):
        starts_new[0] = True
        starts_new[1:] |= sorted_codes[1:, level] != sorted_codes[:-1, level]
        first_rows = np.flatnonzero(starts_new)
        tokens.append(sorted_codes[first_rows, level].astype(np.int32))
        parents.append(node_of_row[first_rows])
        node_of_row = level_starts[-1] + np.cumsum(starts_new, dtype=np.int64) - 1
        level_starts.append(level_starts[-1] + first_rows.size)
    num_nodes = level_starts[-1]
    counts = np.bincount(np.concatenate(parents), minlength=num_nodes)
    child_offsets = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(counts, out=child_offsets[1:])
    return CodeTrie(torch.from_numpy(child_offsets), torch.from_numpy(np.concatenate(tokens)),
                    torch.tensor(level_starts, dtype=torch.int64),
                    torch.from_numpy(order.astype(np.int64)), vocab)


class CodeBook:
    """Unique codes of N identities: row i of `codes` (N, L) is identity i's code over `vocab` tokens."""

    def __init__(self, codes, vocab: int, names=None):
        if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 2:
            raise ValueError(f"vocab: expected an integer >= 2, got {vocab!r}")
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise ValueError(f"codes: expected shape (N, L) with N, L >= 1, got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes: expected an integer dtype, got {codes.dtype}")
        codes = codes.to("cpu", torch.int64).contiguous()
        bad = ((codes < 0) | (codes >= vocab)).any(dim=1).nonzero()
        if bad.numel():
            row = int(bad[0])
            raise ValueError(f"codes: row {row} = {codes[row].tolist()} has a token outside [0, {vocab})")
        if names is not None:
            names = [str(name) for name in names]
            if len(names) != codes.shape[0]:
                raise ValueError(f"names: expected {codes.shape[0]} names (one per code), got {len(names)}")
        array = codes.numpy()
        order = _lexicographic_order(array, int(vocab))
        sorted_codes = array[order]
        duplicate = _first_duplicate(sorted_codes, order)
        if duplicate is not None:
            raise ValueError(f"codes: row {duplicate[0]} duplicates row {duplicate[1]} "
                             f"({array[duplicate[0]].tolist()}); codes must be unique")
        self._codes = codes
        self._vocab = int(vocab)
        self._names = names
        self._cpu_trie = _build_trie(sorted_codes, order, self._vocab)
        self._on_device = {}  # device -> (codes, trie): copies made once, reused without syncs

    @classmethod
    def build(cls, vectors, vocab: int, length=None, method=DEFAULT_METHOD, seed=0, device=None, names=None):
        """Tokenize identity vectors (N, D) into unique codes; length defaults to the smallest L with
        vocab**L >= N. See gif_kernels.tokenize for the methods. The trainer's default, the best recipe
        measured (bench/RESULTS.md), is method "pq" with L = 6 over tokenize.random_vectors."""
        return cls(tokenize(vectors, vocab, length, method=method, seed=seed, device=device), vocab, names)

    @property
    def codes(self) -> torch.Tensor:
        return self._codes

    @property
    def vocab(self) -> int:
        return self._vocab

    @property
    def length(self) -> int:
        return self._codes.shape[1]

    @property
    def num_ids(self) -> int:
        return self._codes.shape[0]

    @property
    def names(self):
        return self._names

    def __repr__(self):
        return f"CodeBook(num_ids={self.num_ids}, length={self.length}, vocab={self.vocab})"

    def _device_copies(self, device):
        device = torch.device(device)
        if device.type == "cpu":
            return self._codes, self._cpu_trie
        if device not in self._on_device:
            self._on_device[device] = (self._codes.to(device), self._cpu_trie.to(device))
        return self._on_device[device]

    def trie(self, device="cpu") -> CodeTrie:
        return self._device_copies(device)[1]

    def codes_for(self, labels: torch.Tensor) -> torch.Tensor:
        """Identity ids (any shape) -> their codes (..., L) int64 on the labels' device.

        Labels outside [0, N) raise on the CPU; on a GPU (where a check would be a host sync) they
        give rows of -1, which fused_code_ce turns into a NaN loss."""
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels: expected an integer dtype, got {labels.dtype}")
        table = self._device_copies(labels.device)[0]
        valid = (labels >= 0) & (labels < self.num_ids)
        if labels.device.type == "cpu" and not bool(valid.all()):
            bad = labels[~valid][0].item()
            raise ValueError(f"labels: identity {bad} is outside [0, {self.num_ids})")
        codes = table[labels.long().clamp(0, self.num_ids - 1)]
        return torch.where(valid.unsqueeze(-1), codes, -1)

    def ids_for(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, L) -> identity ids (B,) int64 on the codes' device; -1 for codes of no identity."""
        if codes.dim() != 2 or codes.shape[1] != self.length:
            raise ValueError(f"codes: expected shape (B, {self.length}), got {tuple(codes.shape)}")
        return self.trie(codes.device).lookup(codes)

    def save(self, path) -> None:
        """Write a safetensors file: codes, optional names (UTF-8), format version and a checksum."""
        dtype = torch.int32 if self.vocab <= 2**31 else torch.int64
        tensors = {"codes": self._codes.to(dtype)}
        if self._names is not None:
            encoded = [name.encode("utf-8") for name in self._names]
            offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
            tensors["names_utf8"] = torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1),
                                                     dtype=torch.uint8)[: offsets[-1]]
            tensors["names_offsets"] = torch.from_numpy(offsets)
        metadata = {"format": FILE_FORMAT, "format_version": str(FORMAT_VERSION),
                    "vocab": str(self.vocab), "sha256": _checksum(tensors)}
        save_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path) -> "CodeBook":
        """Read and validate a file written by save(); truncated or altered files raise ValueError."""
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as error:
            raise ValueError(f"path: {path} is not a readable CodeBook file "
                             f"(truncated or not safetensors): {error}") from error
        if metadata.get("format") != FILE_FORMAT or "codes" not in tensors:
            raise ValueError(f"path: {path} is a safetensors file but not a CodeBook")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"path: {path} has CodeBook format version "
                             f"{metadata.get('format_version')}, this version reads {FORMAT_VERSION}")
        if metadata.get("sha256") != _checksum(tensors):
            raise ValueError(f"path: {path} fails its checksum: the file was altered or damaged")
        names = None
        if "names_offsets" in tensors:
            data = tensors["names_utf8"].numpy().tobytes()
            offsets = tensors["names_offsets"].tolist()
            names = [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
        try:
            vocab = int(metadata.get("vocab", ""))
        except ValueError:
            raise ValueError(f"path: {path} has no valid vocab in its header") from None
        return cls(tensors["codes"], vocab, names)


def _checksum(tensors) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
