"""The DLRM ranker: `torchrec.models.dlrm.DLRM` (or DLRM_DCN) trained through DistributedModelParallel.

Two engines compute the same model and the same updates (row-wise Adagrad for the tables, Adam for the rest):
  dmp    TorchRec DistributedModelParallel on gloo: the planner shards the tables over the ranks (table-wise on
         CPU) and fbgemm's fused kernel applies EXACT_ROWWISE_ADAGRAD inside the backward pass, so the tables never
         hold a gradient. One process, or many under `torchrun` (each rank takes its slice of every batch).
  plain  an unsharded EmbeddingBagCollection with `torchrec.optim.RowWiseAdagrad` as an ordinary optimizer: the
         reference the fast path is compared with (and slower on CPU: docs/results/ranker.md).
Both start from the same seeded weights (the DMP tables are overwritten with them), so a seed fixes the run.

Loss: the mean log loss of the batch, plus (listwise_weight > 0) a listwise term, the softmax cross-entropy of
each request's clicked candidates among its candidates; batches then hold whole requests.

Model selection: after every epoch the model scores the validation rows (the last part of the training window
in time, chosen by the caller); the epoch with the best AUC is kept, and training stops after `patience` epochs
without a better one. The kept weights are gathered to plain tensors, so scoring needs neither DMP nor a process
group: `scoring_model(...)` rebuilds an unsharded DLRM from them.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN

from contracts.threads import default_threads
from ranker.config import DLRMConfig  # noqa: F401  (re-exported)
from ranker.din import DINDLRM, TargetAttention
from ranker.features import DLRMInputs

# parameters under these are embedding tables (the pooled ones, and the din variants' per-position ones); the rest
# is the dense part
TABLE_PREFIXES = ("sparse_arch.", "sequence_arch.")


def is_table(name: str) -> bool:
    return name.startswith(TABLE_PREFIXES)


def build_dlrm(tables: list[EmbeddingBagConfig | EmbeddingConfig], dense_in: int, config: DLRMConfig, max_history: int = 50) -> DLRM | DINDLRM:
    """An unsharded DLRM on CPU; weights drawn from `config.seed`. With per-position tables (EmbeddingConfig: the
    din variants) a DINDLRM, TorchRec's DLRM with target attention over the (at most `max_history`) behaviours as
    one more feature."""
    torch.manual_seed(config.seed)
    bags = [t for t in tables if isinstance(t, EmbeddingBagConfig)]
    positions = [t for t in tables if isinstance(t, EmbeddingConfig) and not isinstance(t, EmbeddingBagConfig)]
    ebc = EmbeddingBagCollection(tables=bags, device=torch.device("cpu"))
    dense_layers = [*config.dense_arch_layers, config.embedding_dim]
    over_layers = [*config.over_arch_layers, 1]
    if positions:
        ec = EmbeddingCollection(tables=positions, device=torch.device("cpu"))
        attention = TargetAttention(2 * config.embedding_dim, config.attention_hidden, config.age_dim, config.attention_softmax)
        dcn = config.dcn_layers if config.interaction == "dcn" else None
        return DINDLRM(ebc, ec, dense_in, dense_layers, over_layers, attention, dcn, config.dcn_low_rank, max_history)
    if config.interaction == "dcn":
        return DLRM_DCN(ebc, dense_in, dense_layers, over_layers, dcn_num_layers=config.dcn_layers, dcn_low_rank_dim=config.dcn_low_rank)
    return DLRM(ebc, dense_in, dense_layers, over_layers)


def scoring_model(tables: list[EmbeddingBagConfig | EmbeddingConfig], dense_in: int, config: DLRMConfig,
                  state: dict[str, torch.Tensor], max_history: int = 50) -> DLRM | DINDLRM:
    """An unsharded DLRM in eval mode holding `state` (as gathered by training)."""
    model = build_dlrm(tables, dense_in, config, max_history)
    model.load_state_dict(state)
    return model.eval()


@torch.inference_mode()
def predict(model: torch.nn.Module, inputs: DLRMInputs, batch_size: int = 16_384) -> np.ndarray:
    """[N] click probabilities of an unsharded model, in row order."""
    if len(inputs) <= batch_size:
        dense, kjt, _ = inputs.batch()
        return torch.sigmoid(model(dense, kjt).squeeze(-1)).numpy().astype(np.float64)
    out = []
    for start in range(0, len(inputs), batch_size):
        dense, kjt, _ = inputs.batch(np.arange(start, min(start + batch_size, len(inputs))))
        out.append(torch.sigmoid(model(dense, kjt).squeeze(-1)).numpy())
    return np.concatenate(out).astype(np.float64)


# ---------------------------------------------------------------------------------------------------- losses


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the clicked candidates within their request, averaged over clicked rows.

    logits, labels [B]; groups [B] int64 request index in 0..G-1. For a clicked row i of request g the term is
    log sum_{j in g} exp(s_j) - s_i. Requests with no click, or with every candidate clicked, have nothing to order
    and are left out; a batch without any such request gives 0.
    """
    count = int(groups.max()) + 1 if len(groups) else 0
    clicks = torch.zeros(count, dtype=logits.dtype).index_add_(0, groups, labels)
    sizes = torch.bincount(groups, minlength=count).to(logits.dtype)
    weight = labels * ((clicks > 0) & (clicks < sizes)).to(logits.dtype)[groups]  # [B] 1 on the rows that count
    # log-sum-exp per request, shifted by the request's max logit so exp never overflows
    top = torch.full((count,), -torch.inf, dtype=logits.dtype).scatter_reduce(0, groups, logits.detach(), "amax")
    sums = torch.zeros(count, dtype=logits.dtype).index_add_(0, groups, torch.exp(logits - top[groups]))
    log_norm = top + torch.log(sums)
    return ((log_norm[groups] - logits) * weight).sum() / weight.sum().clamp(min=1.0)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None, listwise_weight: float) -> torch.Tensor:
    """Mean log loss over the batch, plus `listwise_weight` x `listwise_loss` when the batch has its requests."""
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    if listwise_weight > 0 and groups is not None:
        loss = loss + listwise_weight * listwise_loss(logits, labels, groups)
    return loss


# ---------------------------------------------------------------------------------------------------- processes


@dataclass
class DistContext:
    rank: int
    world: int
    created: bool  # this module started the process group and ends it
    excepthook: Any = None  # sys.excepthook before init_process_group wrapped it (it prefixes "[rank0]:")

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()
            if self.excepthook is not None:  # one-process training inside a longer job: leave the hook as it was
                sys.excepthook = self.excepthook


def init_distributed() -> DistContext:
    """The gloo process group: torchrun's (RANK / WORLD_SIZE set) or a private one-process group."""
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    hook = sys.excepthook
    if world > 1:
        dist.init_process_group("gloo")
    else:
        # an in-memory store: no port to pick, nothing to clash with other jobs on the machine
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(dist.get_rank(), dist.get_world_size(), True, hook if world == 1 else None)


# ---------------------------------------------------------------------------------------------------- engines


class PlainEngine:
    """Unsharded model, RowWiseAdagrad for the tables and Adam for the dense part, as ordinary optimizers."""

    def __init__(self, model: DLRM, config: DLRMConfig):
        from torchrec.optim import RowWiseAdagrad

        self.model, self.listwise_weight = model, config.listwise_weight
        sparse = [p for n, p in model.named_parameters() if is_table(n)]
        dense = [p for n, p in model.named_parameters() if not is_table(n)]
        self.optimizers = [
            RowWiseAdagrad(sparse, lr=config.embedding_lr, eps=config.embedding_eps),
            torch.optim.Adam(dense, lr=config.dense_lr),
        ]

    def train_step(self, dense: torch.Tensor, kjt: KeyedJaggedTensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> float:
        self.model.train()
        loss = training_loss(self.model(dense, kjt).squeeze(-1), labels, groups, self.listwise_weight)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        return float(loss.detach())

    @torch.inference_mode()
    def logits(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        self.model.eval()
        return self.model(dense, kjt).squeeze(-1)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class DMPEngine:
    """DistributedModelParallel: planned sharding, fused row-wise Adagrad in the backward, Adam (DDP) for the rest."""

    def __init__(self, model: DLRM, config: DLRMConfig, context: DistContext):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
        from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        self.context, self.listwise_weight = context, config.listwise_weight
        initial = {k: v.detach().clone() for k, v in model.state_dict().items() if is_table(k)}
        fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": config.embedding_lr, "eps": config.embedding_eps}
        # the pooled tables, and the din variants' per-position ones (an EmbeddingCollection), on the same fused optimizer
        sharders = [EmbeddingBagCollectionSharder(fused_params=fused), EmbeddingCollectionSharder(fused_params=fused)]
        topology = TopologyFactory.create_topology(
            TrainerConfig(world_size=context.world, local_world_size=context.world), kernel_config=KernelConfig(compute_device="cpu")
        )
        # every table table-wise on the fused kernel: left alone, the planner makes small tables data-parallel,
        # and those would be trained by the dense optimizer instead of row-wise Adagrad
        table_configs = list(model.sparse_arch.embedding_bag_collection.embedding_bag_configs())
        if isinstance(model, DINDLRM):
            table_configs += list(model.sequence_arch.embedding_configs())
        constraints = {
            table.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for table in table_configs
        }
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=config.batch_size, constraints=constraints,
            storage_reservation=FixedPercentageStorageReservation(0.15),  # the default heuristic warns it misestimates
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torchrec's own deprecation notices, not ours to act on
            plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
            self.model = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
        self.plan = plan
        # the sharded tables were freshly initialised: put the seeded weights back so every engine and every world
        # size starts from the same point
        self._load_tables(initial)
        dense = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        self.optimizer = torch.optim.Adam(list(dense.values()), lr=config.dense_lr)

    def train_step(self, dense: torch.Tensor, kjt: KeyedJaggedTensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> float:
        self.model.train()
        loss = training_loss(self.model(dense, kjt).squeeze(-1), labels, groups, self.listwise_weight)
        self.optimizer.zero_grad(set_to_none=True)
        # The tables are updated inside backward (fused optimizer). DDP averages the dense gradients over ranks;
        # the tables receive the sum of every rank's row gradients, each rank's loss being a mean over its
        # batch_size / world rows, i.e. world x the 1-process gradient. Row-wise Adagrad divides by the root of
        # the accumulated squared gradients, so that scale cancels (up to eps) and no correction is needed.
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        self.model.eval()
        return self.model(dense, kjt).squeeze(-1)

    def _load_tables(self, full: dict[str, torch.Tensor]) -> None:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            for key, value in self.model.state_dict().items():
                if isinstance(value, ShardedTensor):
                    for shard in value.local_shards():
                        (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                        shard.tensor.copy_(full[key][r : r + h, c : c + w])

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every tensor unsharded, on every rank (gathered to rank 0, then broadcast)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # DMP's state_dict holds ShardedTensors, which warn
            return self._gather_state()

    def _gather_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        out = {}
        for key, value in self.model.state_dict().items():
            if isinstance(value, ShardedTensor):
                full = torch.empty(value.shape, dtype=value.dtype)
                value.gather(dst=0, out=full if self.context.rank == 0 else None)
                if self.context.world > 1:
                    dist.broadcast(full, src=0)
                out[key] = full
            else:
                out[key] = value.detach().clone()
        return out


# ---------------------------------------------------------------------------------------------------- training


def _local(rows: np.ndarray, world: int, rank: int, pad: bool) -> np.ndarray:
    """This rank's equal share of a global batch: padded with its last row (pad) or trimmed to a multiple of world."""
    if world == 1:
        return rows
    extra = (-len(rows)) % world
    rows = np.concatenate([rows, np.repeat(rows[-1:], extra)]) if pad else rows[: len(rows) - len(rows) % world]
    return rows.reshape(world, -1)[rank]


def epoch_batches(size: int, batch_size: int, seed: list[int], groups: np.ndarray | None = None) -> list[np.ndarray]:
    """One epoch's batches of row indices, shuffled by `seed`.

    groups None: a permutation of the `size` rows cut every `batch_size`. groups [size] (request numbers): the
    requests are shuffled and kept whole, a request going to the batch in which its first row falls, so a batch
    holds batch_size rows plus at most the rest of its last request.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(size)
        return [order[start : start + batch_size] for start in range(0, size, batch_size)]
    if size == 0:
        return []
    _, groups = np.unique(groups, return_inverse=True)  # requests numbered 0..G-1
    place = np.empty(int(groups.max()) + 1, dtype=np.int64)  # each request's place in the shuffled order
    place[rng.permutation(len(place))] = np.arange(len(place))
    shuffled = place[groups.reshape(-1)]
    order = np.argsort(shuffled, kind="stable")  # rows request by request, in the shuffled request order
    request_of = shuffled[order]
    first = np.flatnonzero(np.r_[True, request_of[1:] != request_of[:-1]])  # where each request starts
    cuts = first[np.r_[True, np.diff(first // batch_size) > 0]]  # each batch starts with a request
    return [order[a:b] for a, b in zip(cuts, [*cuts[1:], size])]


def _all_gather(values: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def _all_sum(value: float, world: int) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)


def evaluate_logits(engine: PlainEngine | DMPEngine, inputs: DLRMInputs, batch_size: int, world: int, rank: int) -> np.ndarray:
    """[N] logits of every row, every rank scoring its share of each batch (all ranks get all of them)."""
    out = []
    for start in range(0, len(inputs), batch_size):
        rows = np.arange(start, min(start + batch_size, len(inputs)))
        dense, kjt, _ = inputs.batch(_local(rows, world, rank, pad=True))
        out.append(_all_gather(engine.logits(dense, kjt), world)[: len(rows)])
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@dataclass
class DLRMResult:
    state: dict[str, torch.Tensor]  # the selected epoch's weights, unsharded
    best_epoch: float  # the epoch (fractional with evals_per_epoch > 1) whose weights were kept
    log: list[dict]  # one entry per validation
    plan: str | None  # the sharding plan (dmp engine)
    world: int  # processes that trained it


def train_dlrm(
    fit: DLRMInputs,
    valid: DLRMInputs | None,
    tables: list[EmbeddingBagConfig | EmbeddingConfig],
    config: DLRMConfig,
    progress: bool = False,
) -> DLRMResult:
    """Trains on `fit`, selects the epoch by AUC on `valid` (None: keep the last epoch)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if config.engine == "plain" and processes > 1:
        raise ValueError("the plain engine runs in one process; use engine='dmp' under torchrun")
    if config.listwise_weight > 0 and processes > 1:
        # each rank takes an equal slice of every batch, which would cut requests between ranks and normalise the
        # listwise term per rank; not supported yet rather than silently wrong
        raise ValueError("listwise_weight > 0 trains in one process only; run without torchrun or set listwise_weight 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or default_threads())  # the CPU quota's, not the host's core count
    model = build_dlrm(tables, fit.dense.shape[1], config)
    context = init_distributed() if config.engine == "dmp" else DistContext(0, 1, False)
    try:
        engine = DMPEngine(model, config, context) if config.engine == "dmp" else PlainEngine(model, config)
        rank, world = context.rank, context.world
        if config.batch_size < world:
            raise ValueError(f"batch_size ({config.batch_size}) is smaller than the number of processes ({world})")
        log: list[dict] = []
        best_auc, best_epoch, best_state, waited = -np.inf, 0.0, None, 0
        listwise = config.listwise_weight > 0
        if listwise and fit.groups is None:
            raise ValueError("listwise_weight > 0 needs the training inputs' request numbers (DLRMInputs.groups)")
        groups = fit.groups if listwise else None
        stop = False
        for epoch in range(1, config.epochs + 1):
            batches = epoch_batches(len(fit), config.batch_size, [config.seed, epoch], groups)
            # the batch counts after which validation runs: the epoch's end, and equal shares before it
            marks = {max(1, round(len(batches) * j / config.evals_per_epoch)) for j in range(1, config.evals_per_epoch + 1)}
            started, loss_sum, seen = time.perf_counter(), 0.0, 0
            for done, batch in enumerate(batches, 1):
                rows = _local(batch, world, rank, pad=False)
                if len(rows):
                    dense, kjt, labels = fit.batch(rows)
                    local_groups = torch.from_numpy(np.unique(groups[rows], return_inverse=True)[1].reshape(-1)) if listwise else None
                    loss_sum += engine.train_step(dense, kjt, labels, local_groups) * len(rows)
                    seen += len(rows)
                if done not in marks:
                    continue
                seconds = time.perf_counter() - started
                at = epoch - 1 + done / len(batches) if config.evals_per_epoch > 1 else epoch
                entry = {
                    "epoch": round(at, 4),
                    "train_loss": _all_sum(loss_sum, world) / max(_all_sum(seen, world), 1),
                    "examples": int(_all_sum(seen, world)),
                    "seconds": round(seconds, 3),
                    "examples_per_s": round(_all_sum(seen, world) / max(seconds, 1e-9), 1),
                }
                if valid is not None:
                    probs = 1.0 / (1.0 + np.exp(-evaluate_logits(engine, valid, config.eval_batch_size, world, rank)))
                    truth = valid.labels.numpy()
                    entry["valid_auc"] = float(roc_auc_score(truth, probs))
                    entry["valid_logloss"] = float(log_loss(truth, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))
                log.append(entry)
                if progress and rank == 0:
                    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()), flush=True)
                if valid is None or entry["valid_auc"] > best_auc:
                    best_auc, best_epoch, best_state, waited = entry.get("valid_auc", -np.inf), entry["epoch"], engine.full_state(), 0
                else:
                    waited += 1
                    stop = waited > config.patience
                    if stop:
                        break
                started, loss_sum, seen = time.perf_counter(), 0.0, 0
            if stop:
                break
        plan = str(engine.plan) if isinstance(engine, DMPEngine) else None
        return DLRMResult(best_state, best_epoch, log, plan, world)
    finally:
        context.close()
        torch.set_num_threads(threads)
