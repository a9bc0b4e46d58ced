"""Random Checkpoint Replay (SSPO paper, section 4.1): the checkpoint pool, the reference
network that runs a chosen checkpoint, and the losers of an update that it samples.

Per SSPO update (``Losers`` does the first three lines, loop.training_step the rest):

    k = pool.choose(step)                 # uniform over {0 (initial model), 1, ..., K} = the ERD
    reference.load(pool.get(k))           # weights copied in place, no new module
    x0_l = models.sampling.sample(bundle, reference, prompts, latents=z_T, latent_shape=(C,H,W))
    # the training step scores [x0_w; x0_l] with the policy and with that same reference

and every ``replay_every`` optimizer updates ``pool.add(bundle.trainable_state_dict(), step)``.

Snapshots hold only the trainable weights (full UNet, motion modules, or the LoRA adapter).
With LoRA the reference is the policy UNet itself running a second peft adapter "ref"
(no second UNet in memory); with full fine-tuning it is one frozen deep copy of the UNet.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import noise
from models import Bundle, sampling, unet_forward
from models.sharding import copy_full_

STRATEGIES = ("uniform", "initial", "last")
STORAGES = ("memory", "memory_bf16", "disk")


class CheckpointPool:
    """Snapshots of the trainable weights; index 0 is the initial model.

    strategy: "uniform" (RCR: uniform over every stored checkpoint, 0 included), "initial"
    (always 0: the usual fixed reference), "last" (the newest: SPIN-Diffusion's choice).
    storage: "memory" (CPU copies in the original dtype, exact), "memory_bf16" (CPU bf16, half
    the memory, for every snapshot but checkpoint 0), "disk" (one safetensors file per snapshot
    in ``directory``, read when chosen). Checkpoint 0 is always stored exactly: it is the initial
    model, the fixed reference of Diffusion-DPO and the one replayed checkpoint every run shares.
    Every storage saves each snapshot once as a file in ``directory`` (``state_dict``), so that
    checkpoints only name them.
    """

    def __init__(self, strategy: str = "uniform", seed: int = 0, storage: str = "memory",
                 directory: str | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown replay strategy '{strategy}'; expected one of {STRATEGIES}.")
        if storage not in STORAGES:
            raise ValueError(f"Unknown pool storage '{storage}'; expected one of {STORAGES}.")
        if storage == "disk" and not directory:
            raise ValueError("CheckpointPool(storage='disk') needs a directory for its safetensors files.")
        self.strategy, self.seed, self.storage = strategy, int(seed), storage
        self.directory = Path(directory) if directory else None
        self.steps: list[int] = []
        self._snapshots: list[dict[str, torch.Tensor]] = []  # memory storages
        self._files: list[str | None] = []                   # file names in directory (None: not yet written)
        self._crcs: list[int | None] = []                    # CRC-32 of each written file

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, state: dict[str, torch.Tensor], step: int) -> int:
        """Store a snapshot taken after ``step`` optimizer updates; returns its index."""
        index = len(self.steps)
        if self.storage == "disk":
            name, crc = self._write(index, step, state)
            self._files.append(name)
            self._crcs.append(crc)
        else:
            # bf16 rounding (~3 significant digits) would make the replayed "initial model" a
            # different network; checkpoint 0 keeps the original dtype.
            dtype = torch.bfloat16 if self.storage == "memory_bf16" and index > 0 else None
            self._snapshots.append({k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else None,
                                                     copy=True) for k, v in state.items()})
            self._files.append(None)  # written to ``directory`` by the first state_dict() after this
            self._crcs.append(None)
        self.steps.append(int(step))
        return index

    def _write(self, index: int, step: int, state: dict[str, torch.Tensor]) -> tuple[str, int]:
        """One snapshot -> directory/replay_IIII_stepSSSSSSSS.safetensors (atomic); its file name
        and CRC-32. A failed write (a full disk) is an OSError that names the file."""
        from infra.checkpoints import file_crc32
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"replay_{index:04d}_step{step:08d}.safetensors"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # every rank writes the same file: never the same temporary
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
            crc = file_crc32(tmp)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise OSError(f"cannot write replay snapshot {path} ({type(e).__name__}: {e}); earlier checkpoints "
                          f"are kept: free disk space, then --resume") from e
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written snapshot
        return path.name, crc

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        """A snapshot file, read once and checked against its CRC-32 (when the state recorded one),
        keyed in sorted order: safetensors' ``load`` of bytes orders keys differently in each
        process, and the ranks of a job must walk a snapshot in the same order (FSDP gathers a
        sharded tensor per key)."""
        import zlib
        from safetensors.torch import load
        path = self.directory / self._files[index]
        raw = path.read_bytes()
        if self._crcs[index] is not None and zlib.crc32(raw) != self._crcs[index]:
            raise ValueError(f"replay snapshot {path} is damaged (its CRC-32 differs from the one recorded "
                             f"when it was written)")
        return dict(sorted(load(raw).items()))

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """The snapshot's tensors (on CPU; bf16 for memory_bf16, except checkpoint 0)."""
        if not 0 <= index < len(self):
            raise IndexError(f"Checkpoint {index} not in pool of {len(self)}.")
        if self.storage == "disk":
            return self._read(index)
        return self._snapshots[index]

    def choose(self, step: int) -> int:
        """Index of the reference checkpoint for training step ``step``: a function of
        (seed, step, len(pool)) only, so a resumed run makes the same choices."""
        if len(self) == 0:
            raise RuntimeError("The checkpoint pool is empty; add the initial model (checkpoint 0) first.")
        if self.strategy == "initial":
            return 0
        if self.strategy == "last":
            return len(self) - 1
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))
        return int(torch.randint(len(self), (1,), generator=g))

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain JSON-able values: the snapshots are files in
        ``directory``, each written once (memory storages write new snapshots here, the first
        time they are saved) and named here with its CRC-32, never copied into a checkpoint."""
        if self.directory is None:
            raise ValueError("CheckpointPool.state_dict() needs a directory to write its snapshots to")
        for i, name in enumerate(self._files):
            if name is None:
                self._files[i], self._crcs[i] = self._write(i, self.steps[i], self._snapshots[i])
        return {"strategy": self.strategy, "seed": self.seed, "storage": self.storage,
                "steps": list(self.steps), "files": list(self._files), "crc32": list(self._crcs)}

    def load_state_dict(self, d: dict, rebuild=None) -> None:
        """Restore from ``state_dict()``; the files are looked up in this pool's ``directory`` and
        checked against their CRC-32 (every storage: a damaged snapshot is found at resume, not
        when it is drawn). ``rebuild(step)`` -> the trainable weights saved at ``step`` (or None):
        a missing or damaged snapshot is rewritten from them when the result has the recorded
        CRC-32, i.e. is the very same snapshot; otherwise a ValueError/FileNotFoundError."""
        if d["storage"] != self.storage:
            raise ValueError(f"Pool state was saved with storage '{d['storage']}', this pool uses '{self.storage}'.")
        if len(d["steps"]) != len(d["files"]):
            raise ValueError("Corrupt pool state: steps and snapshot files differ in length.")
        files = [Path(f).name for f in d["files"]]  # names only: never a path outside directory
        crcs = list(d.get("crc32") or [None] * len(files))  # absent in states of older versions
        old = (self.strategy, self.seed, self.steps, self._files, self._crcs, self._snapshots)
        self.strategy, self.seed, self.steps = d["strategy"], int(d["seed"]), list(d["steps"])
        self._files, self._crcs, self._snapshots = files, crcs, []
        try:
            for i, f in enumerate(files):
                try:
                    snapshot = self._read(i)
                except (OSError, ValueError) as e:  # missing or damaged
                    snapshot = self._rebuilt(i, rebuild, e)
                if self.storage != "disk":
                    self._snapshots.append(snapshot)
        except Exception:
            self.strategy, self.seed, self.steps, self._files, self._crcs, self._snapshots = old
            raise

    def _rebuilt(self, i: int, rebuild, why: Exception) -> dict[str, torch.Tensor]:
        weights = rebuild(self.steps[i]) if rebuild is not None and self._crcs[i] is not None else None
        if weights is None:
            raise FileNotFoundError(f"replay snapshot {self._files[i]} in {self.directory} is unusable ({why}) "
                                    f"and no checkpoint of step {self.steps[i]} holds its weights") from why
        if self.storage == "memory_bf16" and i > 0:  # as add() stored it
            weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}
        name, crc = self._write(i, self.steps[i], weights)
        if name != self._files[i] or crc != self._crcs[i]:
            (self.directory / name).unlink(missing_ok=True)
            raise ValueError(f"replay snapshot {self._files[i]} is unusable ({why}); the weights of checkpoint "
                             f"step {self.steps[i]} are not the same snapshot") from why
        return self._read(i)


class Reference:
    """The reference network epsilon_ref: run a chosen checkpoint without touching the policy.

    LoRA: a second peft adapter "ref" on ``bundle.unet``; a call switches to it, runs under
    no_grad in eval mode, and switches back, restoring the active adapter, every parameter's
    requires_grad and every module's train/eval mode. Full fine-tuning (or motion modules): one
    frozen deep copy of the UNet whose trainable weights ``load`` overwrites in place.
    Build it before wrapping the UNet in DDP (the "ref" adapter adds parameters), and before a
    resume loads a checkpoint into the policy: built, it runs the initial model (checkpoint 0),
    which is all the reference of Diffusion-DPO, DPO-C&M and SDPO ever is (they keep no pool, so
    no copy of the base model is written to the run's replay/ folder).
    """

    def __init__(self, bundle: Bundle, dtype: torch.dtype | None = None):
        """``dtype``: the autocast dtype of mixed precision (None: off). A full fine-tune's frozen
        copy is kept in it, as diffusers keeps frozen modules in weight_dtype (snapshots are cast
        when loaded); with LoRA the "ref" adapter takes its base layers' dtype (``models.cast_frozen``)."""
        self.bundle = bundle
        self._keys = [n for n, _ in bundle.unet.named_parameters() if bundle.is_trainable(n)]
        if bundle.lora:
            unet = bundle.unet
            with self._preserved(unet):
                active = unet.active_adapters()
                with warnings.catch_warnings():  # peft warns that a second adapter is unusual: here it is the point
                    warnings.simplefilter("ignore", UserWarning)
                    unet.add_adapter(copy.deepcopy(unet.peft_config["default"]), adapter_name="ref")
                unet.set_adapter(active)  # add_adapter activates the new adapter
            self._unet = unet
            self._names = {k: k.replace(".default.", ".ref.") for k in self._keys}
            params = dict(unet.named_parameters())
            for name in self._names.values():
                params[name].requires_grad_(False)
            self.load(bundle.trainable_state_dict())  # "ref" starts as the policy's adapter: checkpoint 0
        else:
            self._unet = copy.deepcopy(bundle.unet).requires_grad_(False).eval()
            if dtype is not None:
                self._unet.to(dtype)
            self._names = {k: k for k in self._keys}

    @property
    def unet(self) -> torch.nn.Module:
        """The module the reference runs (the policy UNet itself with LoRA)."""
        return self._unet

    @property
    def denoiser(self) -> "Reference":
        """``denoise_fn(x_t, t, text_emb, extra=None) -> pred`` for ``sampling.sample``."""
        return self

    @torch.no_grad()
    def load(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Copy a pool snapshot into the reference weights in place (casting dtype/device; under
        FSDP the reference is sharded like the policy and each rank keeps its chunk)."""
        if set(snapshot) != set(self._keys):
            extra, missing = set(snapshot) - set(self._keys), set(self._keys) - set(snapshot)
            raise ValueError(f"Snapshot does not match this model's trainable weights: "
                             f"{len(missing)} missing (e.g. {sorted(missing)[:2]}), "
                             f"{len(extra)} unexpected (e.g. {sorted(extra)[:2]}).")
        params = dict(self._unet.named_parameters())  # looked up now: sharding replaces the Parameters
        for k, v in snapshot.items():
            # memory_bf16 snapshots; float32 ones into a reference kept in the autocast dtype
            copy_full_(params[self._names[k]], v, name=k, cast_from=(torch.bfloat16, torch.float32))

    @staticmethod
    @contextlib.contextmanager
    def _preserved(unet: torch.nn.Module):
        """Restore requires_grad flags and train/eval modes, whatever peft/diffusers change."""
        flags = {n: p.requires_grad for n, p in unet.named_parameters()}
        modes = {n: m.training for n, m in unet.named_modules()}
        try:
            yield
        finally:
            for n, p in unet.named_parameters():
                p.requires_grad_(flags.get(n, False))  # new (adapter "ref") parameters stay frozen
            for n, m in unet.named_modules():
                m.training = modes.get(n, False)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor,
                 extra: dict | None = None) -> torch.Tensor:
        """x_t (B,C,H,W) or (B,C,F,H,W), t scalar or (B,), text_emb (B,77,D), extra: the UNet's
        added conditioning (SDXL) -> pred like x_t."""
        with torch.no_grad():
            if not self.bundle.lora:
                return unet_forward(self.bundle, self._unet, x_t, t, text_emb, extra)
            unet = self._unet
            with self._preserved(unet):
                active = unet.active_adapters()
                unet.eval()
                unet.set_adapter("ref")
                try:
                    return unet_forward(self.bundle, unet, x_t, t, text_emb, extra)
                finally:
                    unet.set_adapter(active)


class Losers:
    """The reference and the losers of each update: ``begin(step)`` draws the update's reference
    checkpoint and loads it, ``next_batch(stream, micro)`` returns micro-batch ``micro`` with its
    ``x0_l``. For SFT (no pool, no reference) both only pass the data through; for Diffusion-DPO,
    DPO-C&M and SDPO (no pool: the reference stays the initial model it was built as) ``x0_l`` is
    the data's own loser (pixels).

    For the SSPO family (``replayed=True``) ``x0_l`` (B,*shape), in diffusion space, is sampled
    by the drawn checkpoint (RCR, sec. 4.1) from per-pair initial noise z_T keyed by (seed, step
    of the cycle, dataset index):

    - ``every = k > 1`` (cfg.loser_every): updates come in cycles of k. The cycle's first update
      ``gen_step`` draws c = pool.choose(gen_step), takes fresh batches and samples their losers
      with c; the next k-1 updates retrain on those same (prompt, winner, loser) pairs with fresh
      (t, eps), and c stays their reference, so every pair is scored by the checkpoint that made
      its loser. The pool only grows at multiples of replay_every, which config.validate makes a
      multiple of k, so c is a function of gen_step alone and a resume inside a cycle samples the
      very same losers.
    - ``group = g > 1`` (cfg.loser_batch // batch_size): the losers of g micro-batches of an
      update are sampled in one call when the first of them is reached: the same losers, up to
      floating-point rounding, in fewer and larger network calls (the batches are taken from
      the stream in the same order, only earlier).
    """

    def __init__(self, *, pool: CheckpointPool | None, reference: Reference | None, replayed: bool,
                 every: int = 1, group: int = 1, grad_accum: int = 1, sample: dict | None = None, seed: int = 0,
                 shape: tuple = (), process=None, device=None, autocast=contextlib.nullcontext):
        self.pool, self.reference, self.replayed = pool, reference, replayed
        self.every, self.group = (every, group) if replayed else (1, 1)
        self.grad_accum = grad_accum  # micro-steps per update: a group never reaches into the next update
        self.sample_kwargs = dict(sample or {})  # num_inference_steps, guidance_scale, scheduler
        self.seed, self.shape, self.process, self.device, self.autocast = seed, shape, process, device, autocast
        self.loaded: int | None = None   # the pool entry the reference holds now
        self.cycle_step: int | None = None  # the update whose checkpoint and z_T make the cached losers
        self.cycle_ref: int | None = None
        self.batches: list[dict | None] = []  # the cycle's micro-batches with their losers

    def begin(self, step: int) -> int | None:
        """Draw update ``step``'s reference checkpoint (that of its cycle's first update) and load it
        into the reference network; returns its pool index (without a pool: 0 when there is a
        reference, the initial model it was built as; None for SFT)."""
        if self.pool is None:
            return None if self.reference is None else 0
        gen_step = step - step % self.every
        ref = self.pool.choose(gen_step)
        if ref != self.loaded:
            self.reference.load(self.pool.get(ref))  # in place: one reference module, or a LoRA adapter
            self.loaded = ref
        if self.replayed and gen_step != self.cycle_step:
            self.cycle_step, self.cycle_ref, self.batches = gen_step, ref, []  # a new cycle
        return ref

    def next_batch(self, stream, micro: int) -> dict:
        """Micro-batch ``micro`` of the current update, with ``x0_l``: the next one from the
        stream, or the cycle's cached batch with its replayed losers, sampled on first use with
        those of the next group - 1 micro-batches of the update (``micro`` counts from 0 at each
        update; the caller's grad_accum bounds it)."""
        if not self.replayed:
            return next(stream)
        if self.cycle_ref != self.loaded:  # never score a loser with another checkpoint
            raise RuntimeError(f"replayed losers of update {self.cycle_step} were made by checkpoint "
                               f"{self.cycle_ref}, but the reference holds {self.loaded}")
        if micro == len(self.batches):
            group = [next(stream) for _ in range(min(self.group, self.grad_accum - micro))]
            made = self.sample(group, self.cycle_step)
            self.batches += [dict(b, x0_l=x0_l) for b, x0_l in zip(group, made)]
        batch = self.batches[micro]
        if self.every == 1:  # used once: do not hold its pixels and losers until the next update
            self.batches[micro] = None
        return batch

    def sample(self, batches: list[dict], step: int) -> list[torch.Tensor]:
        """x0_l (B_i,*shape) per batch: the loaded reference checkpoint's samples for the batches'
        prompts, from the initial noise z_T keyed by (seed, ``step``, dataset index); all batches
        in one sampling call."""
        z_T = torch.cat([noise.pair_noise(self.seed, step, b["index"], self.shape, self.process)[2] for b in batches])
        prompts = [p for b in batches for p in b["prompt"]]
        with self.autocast():
            x0_l = sampling.sample(self.reference.bundle, self.reference, prompts, latents=z_T.to(self.device),
                                   latent_shape=self.shape, **self.sample_kwargs)
        return list(x0_l.split([len(b["prompt"]) for b in batches]))
