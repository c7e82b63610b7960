"""Tests run tiny models: one torch thread avoids thread oversubscription on CI's 2 cores."""
import torch

torch.set_num_threads(1)
