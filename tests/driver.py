"""Drive the dp_attention step directly (no artifact): prefill then decode through the paged cache.

Used by the model tests to check the step against Hugging Face goldens and against itself under
other meshes and padding modes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dp_attention import (Bucket, CacheShape, DpPaddingMode, HFCheckpoint, Layout, init_cache, jit_step,
                          load_hf_config, make_mesh, place, random_reader, weight_specs)
from dp_attention.config import PRESETS
from runtime.batching import Chunk, pack

CACHE = CacheShape(num_pages=24, page_size=8, pages_per_seq=8)


def round_up(n, m):
    return max(m, -(-n // m) * m)


class StepDriver:
    def __init__(self, model, mesh_shape, dtype="float32", cache=CACHE, dense_reference=False, expert_layout=None,
                 quantize="none", quantize_lm_head=False, wrap_reader=None, steps_of=None, **step_options):
        """step_options: the step's other StepOptions (e.g. attention="fa" with a reference fa_kernel);
        expert_layout: a name of dp_attention.weights.EXPERT_LAYOUTS (default: the chosen one);
        quantize / quantize_lm_head: as `export build --quantize`; wrap_reader: reader -> reader, to
        run the step on altered weights (e.g. a plain fake-quantized reference); steps_of: another
        driver of the same step (model, mesh, weight specs and options) on other weights, whose
        compiled steps this one runs instead of compiling its own."""
        if model in PRESETS:
            self.cfg = PRESETS[model]
            read = random_reader(self.cfg, seed=0)
        else:
            self.cfg = load_hf_config(model)
            ckpt = HFCheckpoint(model)
            read = ckpt.read
        self.shape, self.cache_shape, self.dtype = mesh_shape, cache, dtype
        self.mesh = make_mesh(mesh_shape)
        self.specs = weight_specs(self.cfg, mesh_shape, expert_layout, quantize, quantize_lm_head)
        if model not in PRESETS:
            ckpt.check(self.specs)
        if wrap_reader is not None:
            read = wrap_reader(read)
        self.weights = place(self.specs, read, self.mesh, dtype)
        self.dense_reference = dense_reference
        self.step_options = step_options
        self.reset()
        self._steps = {}
        if steps_of is not None:
            same = (self.cfg, self.shape, self.cache_shape, self.dtype, self.specs, dense_reference, step_options)
            assert same == (steps_of.cfg, steps_of.shape, steps_of.cache_shape, steps_of.dtype, steps_of.specs,
                            steps_of.dense_reference, steps_of.step_options), "not the same step"
            self._steps = steps_of._steps  # shared: either fills it

    def reset(self):
        layout = Layout.for_mesh(self.cfg, self.shape)
        quant = self.step_options.get("kv_quant")
        self.cache = init_cache(self.cfg, layout, self.mesh, self.cache_shape,
                                jnp.dtype(quant.dtype if quant is not None else self.dtype),
                                self.step_options.get("attention", "native"))
        self.next_page = [1] * self.shape.dp

    def alloc(self, group, n_pages):
        first = self.next_page[group]
        self.next_page[group] += n_pages
        assert self.next_page[group] <= self.cache_shape.num_pages, "test cache too small"
        return tuple(range(first, first + n_pages))

    def step(self, groups, mode=DpPaddingMode.MAX_LEN, tokens=None, seqs=None, global_len=None):
        counts = [sum(len(c.tokens) for c in g) for g in groups]
        T = tokens or round_up(max(counts), 8)
        S = seqs or round_up(max(len(g) for g in groups), 2)
        if mode is DpPaddingMode.MAX_LEN:
            G = self.shape.dp * T
        else:
            G = global_len or round_up(sum(counts), 8)
        bucket = Bucket(mode, T, S, G)
        if bucket not in self._steps:
            self._steps[bucket] = jit_step(self.cfg, bucket, self.mesh, self.specs, dense_reference=self.dense_reference,
                                           with_logits=True, **self.step_options)
        batch = pack(groups, T, S, self.cache_shape.pages_per_seq)
        out, self.cache = self._steps[bucket](self.weights, self.cache, batch)
        self.last_outputs = {k: np.asarray(v) for k, v in out.items()}
        logits = self.last_outputs["logits"]
        return [[logits[g, j] for j in range(len(chunks))] for g, chunks in enumerate(groups)]

    def generate(self, prompts_by_group, new_tokens, mode=DpPaddingMode.MAX_LEN):
        """Greedy: one prefill step for every prompt, then decode steps. Returns (first logits, tokens)."""
        ps = self.cache_shape.page_size
        need = max(len(p) for g in prompts_by_group for p in g) + new_tokens
        pages = [[self.alloc(g, -(-need // ps)) for _ in prompts] for g, prompts in enumerate(prompts_by_group)]
        groups = [[Chunk(tuple(p), 0, pages[g][j]) for j, p in enumerate(prompts)]
                  for g, prompts in enumerate(prompts_by_group)]
        first = self.step(groups, mode)
        out = [[[int(np.argmax(l))] for l in g] for g in first]
        lengths = [[len(p) for p in prompts] for prompts in prompts_by_group]
        for _ in range(new_tokens - 1):
            groups = [[Chunk((out[g][j][-1],), lengths[g][j] + len(out[g][j]) - 1, pages[g][j])
                       for j in range(len(prompts))] for g, prompts in enumerate(prompts_by_group)]
            logits = self.step(groups, mode)
            for g, row in enumerate(logits):
                for j, l in enumerate(row):
                    out[g][j].append(int(np.argmax(l)))
        return first, out
