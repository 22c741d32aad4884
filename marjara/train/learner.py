"""The Learner: builds the DeepSpeed engine around MarjaraModel and runs train / eval / save."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from marjara.checkpoint import store as ckpt
from marjara.checkpoint.ema_reader import ema_tensors
from marjara.checkpoint.format import Checkpoint, find_resume_point
from marjara.compat import repair_universal_optimizer
from marjara.train.allocator import active_allocator
from marjara.model.config import PRESETS, ModelConfig
from marjara.data import TrainStream, open_data, validation_batches
from marjara.distributed import ensure_process_group, rank, world_size
from marjara.train.ds_config import resolve_engine_settings
from marjara.train.engine import initialize_engine
from marjara.train.ema import WeightEMA
from marjara.errors import MarjaraError
from marjara.train.metrics import Reporter, device_peak_tflops
from marjara.model import MarjaraModel
from marjara.train.optim import build_adamw, parameter_groups, warmup_cosine
from marjara.model.param_names import is_expert_param

VOCAB_MULTIPLE = 64
MOE_FIELDS = ("num_experts", "top_k", "ep_size", "capacity_factor", "eval_capacity_factor", "min_capacity",
              "moe_layer_freq", "use_residual", "aux_loss_coef")


def model_config_from_args(args, data_vocab: int, seq_len: int) -> ModelConfig:
    overrides = dict(vocab_size=-(-data_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, dropout=args.dropout,
                     max_seq_len=max(seq_len, PRESETS[args.model_size]["max_seq_len"]))
    if args.use_moe:
        overrides.update(use_moe=True, **{name: getattr(args, name) for name in MOE_FIELDS})
    return ModelConfig.from_preset(args.model_size, **overrides)


def quiet_libraries(this_rank: int) -> None:
    """DeepSpeed logs at INFO on every rank, and torch warns about DeepSpeed's collectives on every
    call; MARJARA reports progress itself, from rank 0."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING if this_rank == 0 else logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class Learner:
    def __init__(self, args) -> None:
        self.args = args
        ensure_process_group()
        self.rank, self.world = rank(), world_size()
        quiet_libraries(self.rank)
        self.has_gpu = torch.cuda.is_available()
        self.settings = resolve_engine_settings(args, self.world, self.has_gpu, args.use_moe)
        self.resume = find_resume_point(args.resume) if args.resume else None
        self.report = Reporter(self.rank == 0, self.settings.log_dir, Path(args.out_dir) / "metrics.jsonl",
                               args.max_steps, self.resume.meta["step"] if self.resume else 0)

        seq_len = args.seq_len if args.seq_len is not None else PRESETS[args.model_size]["max_seq_len"]
        self.data = open_data(args.data, seq_len, args.tokenizer)
        self.seq_len = seq_len
        self.config = model_config_from_args(args, self.data.vocab_size, seq_len)
        self.data.check_model_vocab(self.config.vocab_size)
        if self.resume:
            self._check_compatible(self.resume.meta)

        torch.manual_seed(args.seed)  # identical initial weights on every rank
        model = MarjaraModel(self.config)
        # Lets DeepSpeed's ds_to_universal convert ZeRO-1/2 checkpoints for another world size.
        model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
        if args.grad_checkpointing:
            self._configure_activation_checkpointing(model)
        self.engine = self._build_engine(model)
        self.model = self.engine.module
        self.ema = WeightEMA(self.model, args.ema_decay, self.settings.zero_stage) if args.ema_decay > 0 else None
        self.step, samples_consumed = 0, 0
        if self.resume:
            self.step, samples_consumed = self._load(self.resume)
        self.stream = TrainStream(self.data.train, args.seed, self.settings.micro_batch, self.settings.grad_accum,
                                  self.rank, self.world, samples_consumed)
        self.val_batches = (validation_batches(self.data.val, self.settings.micro_batch, args.eval_batches,
                                               self.rank, self.world) if args.eval_interval > 0 else [])
        if args.compile:
            self._compile()
        self._signal = 0
        # DeepSpeed reports the gradient norm under ZeRO and mixed precision, not for plain fp32
        # data parallelism; there every rank holds the whole averaged gradient, so measure it here.
        self._measure_grad_norm = (self.settings.zero_stage == 0 and self.settings.precision == "fp32"
                                   and not (self.config.use_moe and self.config.ep_size > 1))
        self._grad_norm = None

    # ---- set-up ---------------------------------------------------------------------------
    def _check_compatible(self, meta: dict) -> None:
        if meta["zero_stage"] != self.settings.zero_stage:
            raise MarjaraError(
                f"--resume {self.args.resume}: the checkpoint was saved under ZeRO stage {meta['zero_stage']}, this run "
                f"uses stage {self.settings.zero_stage}; resume with ds_configs/zero{meta['zero_stage']}.json or a copy of it"
            )
        saved = ModelConfig.from_dict(meta["model_config"])
        differences = saved.differences(self.config)
        if differences:
            raise MarjaraError(
                f"--resume {self.args.resume}: the checkpoint's model differs from this run's ({'; '.join(differences)} "
                "as checkpoint != now); pass the same model flags as the original run"
            )
        if meta["tokenizer"] != self.data.tokenizer_name:
            raise MarjaraError(
                f"--resume {self.args.resume}: the checkpoint was trained with tokenizer {meta['tokenizer']!r}, "
                f"this data uses {self.data.tokenizer_name!r}; use data prepared with the same tokenizer"
            )

    def _configure_activation_checkpointing(self, model: MarjaraModel) -> None:
        import deepspeed

        block = self.settings.ds_config.get("activation_checkpointing", {})
        deepspeed.checkpointing.configure(
            None, partition_activations=block.get("partition_activations", False),
            checkpoint_in_cpu=block.get("cpu_checkpointing", False),
            synchronize=block.get("synchronize_checkpoint_boundary", False),
            profile=block.get("profile", False))
        # The non-re-entrant variant: the re-entrant one silently drops parameter gradients of
        # blocks none of whose inputs require grad.
        model.checkpoint_fn = deepspeed.checkpointing.non_reentrant_checkpoint

    def _build_engine(self, model: MarjaraModel):
        s, args = self.settings, self.args
        groups = parameter_groups(model, args.weight_decay)
        optimizer = None if s.optimizer_in_json else build_adamw(groups, s.lr)
        scheduler = None
        if not s.scheduler_in_json:
            def scheduler(opt):
                return warmup_cosine(opt, args.warmup_steps, args.max_steps, s.min_lr / s.lr)
        self.universal = bool(self.resume and s.zero_stage > 0 and self.resume.meta["world_size"] != self.world)
        if self.universal:
            s.ds_config["checkpoint"] = {**s.ds_config.get("checkpoint", {}), "load_universal": True}
        engine = initialize_engine(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                   model_parameters=groups if optimizer is None else None, config=s.ds_config)
        self._group_hparams = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        return engine

    def _compile(self) -> None:
        if self.config.use_moe:
            self.report.print("--compile: torch.compile cannot trace DeepSpeed's MoE layers (data-dependent "
                              "all-to-all); training uncompiled")
            return
        self.engine.compile()
        self.report.print("--compile: the model runs under torch.compile; the first step includes compiling it")

    # ---- resume -------------------------------------------------------------------------
    def _load(self, point: Checkpoint) -> tuple[int, int]:
        meta = point.meta
        tag = ckpt.universal_tag(point) if self.universal else point.tag
        load_path, _ = self.engine.load_checkpoint(str(point.ckpt_dir), tag=tag)
        if load_path is None:
            raise MarjaraError(f"DeepSpeed found no checkpoint at {point.ckpt_dir / tag}; resume from another tag")
        if self.universal:
            repair_universal_optimizer(self.engine, self._group_hparams)
        same_world = meta["world_size"] == self.world
        if same_world:
            state = torch.load(point.rank_file(self.rank), weights_only=True)
            ckpt.set_rng_state(state["rng"])
        if self.ema is not None:
            saved = meta.get("ema")
            if not saved:
                raise MarjaraError(f"--ema_decay is set but checkpoint {point.tag_dir} holds no EMA; resume without it")
            if same_world and saved["layout"] == self.ema.layout:
                self.ema.load_own(state)
            else:
                self.ema.load_full(ema_tensors(point))
        self.report.print(f"resumed from {point.tag_dir} at step {meta['step']} "
                          f"({meta['samples_consumed']} samples consumed{', universal' if self.universal else ''})")
        return meta["step"], meta["samples_consumed"]

    # ---- training -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_requests(self):
        """SIGTERM/SIGINT during training ask for a save and a clean stop. The previous handlers
        come back afterwards, so nothing outside fit() keeps this Learner (and its engine) alive."""
        def request_stop(signum, _frame):
            self._signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_signal(self) -> int:
        flag = torch.tensor([self._signal], dtype=torch.int64)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().float().cpu()
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        return values

    def fit(self) -> int:
        """Train to max_steps (or a stop signal); returns the process exit code."""
        with self._stop_requests():
            return self._train()

    def _train(self) -> int:
        args, s, engine = self.args, self.settings, self.engine
        tokens_per_step = s.micro_batch * s.grad_accum * self.world * self.seq_len
        flops_per_token = self.model.flops_per_token(self.seq_len)
        peak, peak_source = device_peak_tflops(args.peak_tflops)
        self.report.print(
            f"world_size={self.world} zero_stage={s.zero_stage} precision={s.precision} "
            f"model={self.config.preset} ({self.model.num_parameters() / 1e6:.2f}M params, "
            f"{self.model.num_active_parameters() / 1e6:.2f}M active) data={self.data.description} "
            f"tokenizer={self.data.tokenizer_name} global_batch={tokens_per_step} tokens "
            f"peak={peak:.2f} TFLOP/s ({peak_source})" + ("" if self.has_gpu else f" malloc={active_allocator()}"))
        sums = torch.zeros(2)  # loss, aux loss over the log interval
        window_steps, window_start = 0, time.perf_counter()
        last_saved = self.step if self.resume else -1
        while self.step < args.max_steps:
            for _ in range(s.grad_accum):
                x, y = self.stream.next_micro_batch()
                _, loss = engine(x.to(engine.device), y.to(engine.device))
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    self._step_lr = engine.get_lr()[0]  # engine.step() advances the scheduler
                    if self._measure_grad_norm:
                        self._grad_norm = self._replica_grad_norm()
                engine.step()
                aux = self.model.last_aux_loss
                sums += torch.stack([loss.detach().float().cpu(),
                                     aux.detach().float().cpu() if aux is not None else torch.zeros(())]) / s.grad_accum
            self.step += 1
            window_steps += 1
            if self.ema is not None:
                self.ema.update()
            self.report.advance()
            if self.step % args.log_interval == 0 or self.step == args.max_steps:
                elapsed = time.perf_counter() - window_start
                self._log_train(sums / window_steps, tokens_per_step * window_steps / elapsed, flops_per_token, peak)
                sums.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if args.eval_interval > 0 and (self.step % args.eval_interval == 0 or self.step == args.max_steps):
                self._log_eval()
            if args.save_interval > 0 and self.step % args.save_interval == 0:
                self.save()
                last_saved = self.step
            signum = self._stop_signal()
            if signum:
                if last_saved != self.step:
                    self.save()
                name = signal.Signals(signum).name
                self.report.print(f"{name}: saved checkpoint at step {self.step} in {args.out_dir}; "
                                  f"continue with --resume {args.out_dir}")
                self.report.close()
                return 128 + signum
        if last_saved != self.step:
            self.save()
        self._verify_replicas()
        self._print_sample()
        self.report.close()
        return 0

    def _replica_grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def _log_train(self, means: torch.Tensor, tokens_per_sec: float, flops_per_token: float, peak: float) -> None:
        loss, aux = self._mean_over_ranks(means).tolist()
        lr = self._step_lr
        values = {"train/loss": loss, "train/lr": lr, "train/tokens_per_sec": tokens_per_sec}
        if peak > 0:
            values["train/mfu"] = flops_per_token * tokens_per_sec / (peak * 1e12 * self.world)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        if self.settings.precision == "fp16":
            values["train/loss_scale"] = float(self.engine.optimizer.cur_scale)
        if self.config.use_moe:
            values["moe/aux_loss"] = aux
            for layer, counts in self.model.last_expert_counts.items():
                counts = counts.float()
                values[f"moe/expert_load_max_over_mean/layer{layer}"] = float(counts.max() / counts.mean().clamp(min=1))
        line = f"loss {loss:.4f} | lr {lr:.2e} | {tokens_per_sec:,.0f} tok/s"
        if "train/mfu" in values:
            line += f" | mfu {values['train/mfu']:.1%}"
        self.report.log(self.step, values, line)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross-entropy over the fixed validation batches of all ranks."""
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for x, y in self.val_batches:
            logits, _ = self.engine(x.to(self.engine.device))
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(logits.device).view(-1),
                                   reduction="sum", ignore_index=-1)
            totals += torch.tensor([loss.item(), int((y != -1).sum())], dtype=torch.float64)
        self.engine.train()
        if self.world > 1:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1])

    def _log_eval(self) -> None:
        loss = self.evaluate()
        values = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        line = f"val loss {loss:.4f} | ppl {values['val/ppl']:.2f}"
        if self.ema is not None:
            with self.ema.swapped_in():
                values["val/loss_ema"] = self.evaluate()
            line += f" | ema val loss {values['val/loss_ema']:.4f}"
        self.report.log(self.step, values)
        self.report.print(f"step {self.step:>6} | {line}")

    # ---- saving -------------------------------------------------------------------------
    def save(self) -> Path:
        meta = {
            "step": self.step,
            "samples_consumed": self.stream.samples_consumed,
            "tokens_seen": self.stream.samples_consumed * self.seq_len,
            "seq_len": self.seq_len,
            "model_config": self.config.to_dict(),
            "tokenizer": self.data.tokenizer_name,
            "zero_stage": self.settings.zero_stage,
            "world_size": self.world,
            "dtype": self.settings.precision,
            "ema": self.ema.meta() if self.ema else None,
            "train_args": {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        }
        rank_state = {"rng": ckpt.rng_state(), "ema": {}, "ema_shapes": {}}
        if self.ema is not None:
            rank_state.update(self.ema.state_dict())
        tag_dir = ckpt.save(self.engine, self.args.out_dir, self.step, meta, rank_state, self.args.keep_last)
        self.report.print(f"step {self.step:>6} | saved {tag_dir}")
        return tag_dir

    # ---- end of run ---------------------------------------------------------------------
    def _verify_replicas(self) -> None:
        """Data-parallel replicas must end bit-identical; a silent divergence would waste the run."""
        if self.world == 1 or self.settings.zero_stage == 3:
            return
        digest = hashlib.sha256()
        for name, param in self.model.named_parameters():
            if not is_expert_param(name):
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = torch.tensor([int.from_bytes(digest.digest()[:8], "little", signed=True)], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        if any(int(d) != int(mine) for d in every):
            raise RuntimeError("data-parallel replicas ended with different weights; the run is not trustworthy")
        self.report.print(f"weights identical on all {self.world} ranks")

    def _print_sample(self) -> None:
        if self.args.sample_tokens <= 0:
            return
        tokenizer = self.data.tokenizer
        prompt = tokenizer.encode("The ") or [tokenizer.eot_id]
        budget = min(self.args.sample_tokens, self.config.max_seq_len - len(prompt))
        # Every rank generates (ZeRO-3 and expert parallelism need all ranks in each forward).
        tokens = self.model.generate([prompt], budget, temperature=0.8, top_k=40, seed=self.args.seed,
                                     eos_token_id=tokenizer.eot_id)[0]
        self.report.print("sample: " + tokenizer.decode(prompt + tokens))
