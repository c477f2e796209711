"""Random code books shared by the beam search tests of the GPU kernels."""
import torch

from gif_kernels import CodeBook


def random_codebook(num_ids, vocab, length, seed):
    """num_ids unique random codes in random id order, and the generator for further draws."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.unique(torch.randint(0, vocab, (2 * num_ids, length), generator=gen), dim=0)
    codes = codes[torch.randperm(codes.shape[0], generator=gen)[:num_ids]]
    return CodeBook(codes, vocab), gen
