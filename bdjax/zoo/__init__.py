"""Model zoos: populations of clean and poisoned models trained together, stored in chunks with a manifest."""
from bdjax.zoo.plan import CORNERS, ModelRecord, TriggerPool, load_trigger_pool, plan_zoo
from bdjax.zoo.store import ZooStore
from bdjax.zoo.train import ZooConfig, ZooSection, train_chunk, train_zoo

__all__ = ["CORNERS", "ModelRecord", "TriggerPool", "ZooConfig", "ZooSection", "ZooStore", "load_trigger_pool",
           "plan_zoo", "train_chunk", "train_zoo"]
