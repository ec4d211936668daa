"""The native inference engine. Imports nothing from the server, database, signals or workers."""

from app.engine.async_engine import AsyncEngine, EngineDeadError
from app.engine.config import EngineConfig
from app.engine.core import EngineCore, EngineStats, QueueFullError
from app.engine.llm import LLM
from app.engine.lora import LoRAInfo, LoRARequest
from app.engine.request import CompletionOutput, Logprob, RequestOutput, SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineCore",
    "EngineDeadError",
    "EngineStats",
    "LoRAInfo",
    "LoRARequest",
    "Logprob",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
]
