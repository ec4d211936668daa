"""Model sources for pulls into the model store: a local path, S3, ModelScope and Hugging Face.

`service.pull_model` is the job entry point; `dispatch.list_source_files` picks the source module by
the scheme of what the user typed. The network clients (minio, modelscope, huggingface_hub) are
imported only by the source that needs them, so importing this package stays cheap.
"""
