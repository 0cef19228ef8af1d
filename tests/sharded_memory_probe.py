"""Run by test_distributed under torchrun (2 processes): how much each process's memory grows over 4 sharded
forward and backward passes of a 97 MB BERT whose blocks are gathered and freed on every pass, into
rankN.txt (MB: growth, model). Argument `off` leaves glibc's allocator as it is (the fix's control, by hand)."""
import sys

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification

from tunelab.train import sharding
from tunelab.train.distributed import Ranks, exit_process, leave_process_group
from tunelab.train.tracking import current_rss_mb

if sys.argv[1:] == ["off"]:
    sharding.return_freed_memory_to_the_system = lambda *args: False
dist.init_process_group("gloo")
torch.manual_seed(0)
config = BertConfig(vocab_size=64, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048,
                    max_position_embeddings=32)
model = BertForSequenceClassification(config)
for name, param in model.named_parameters():
    param.requires_grad_(name.startswith("classifier"))
model = sharding.shard_model(model, torch.device("cpu"), Ranks(dist.get_rank(), dist.get_world_size()))
ids = torch.randint(0, 64, (4, 16))
start = current_rss_mb()
for _ in range(4):
    model(input_ids=ids, labels=torch.zeros(4, dtype=torch.long)).loss.backward()
model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
with open(f"rank{dist.get_rank()}.txt", "w") as out:  # (one file each: lines printed together interleave)
    out.write(f"{current_rss_mb() - start:.1f} {model_mb:.1f}")
# Ended as tunelab's own launched processes end (train/distributed.py): together, the group left, and no
# interpreter teardown, whose C++ destructors of gloo's threads aborted a finished probe once in CI.
dist.barrier()
leave_process_group()
exit_process(0)
