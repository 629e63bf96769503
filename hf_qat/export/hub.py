"""Push an export folder to the Hugging Face Hub in one commit (huggingface_hub; the token comes from
the ``token`` argument, ``HF_TOKEN`` or the cached login)."""

from __future__ import annotations


def push_folder(folder: str, repo_id: str, private: bool = True, token: str | None = None,
                commit_message: str = "Upload low-bit checkpoint exported by hf_qat") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return commit.commit_url
