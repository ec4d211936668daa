"""Jobs: the slow work of the control plane (model pulls, LoRA conversions, engine builds, benchmark
runs). Services receive a JobContext; they never touch the job row, Celery or HTTP themselves."""
