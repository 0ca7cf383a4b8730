"""``umg eval zeroshot`` / ``retrieval`` read their data from a real S3 server (SeaweedFS): same results as local."""

from __future__ import annotations

from test_cli_eval import _invoke, _last_json, caption_set, image_folder  # noqa: F401 - fixtures


def _upload(server, local, url):
    server.filesystem().put(str(local), url.removeprefix("s3://"), recursive=True)
    return url


def test_zeroshot_and_retrieval_from_s3_equal_local(tiny_checkpoint, image_folder, caption_set, s3_server, s3_bucket):
    remote_folder = _upload(s3_server, image_folder, f"{s3_bucket}/colours")
    ckpt = tiny_checkpoint[0]
    local = _last_json(_invoke("zeroshot", "--checkpoint", ckpt, "--data", image_folder))
    remote = _last_json(_invoke("zeroshot", "--checkpoint", ckpt, "--data", remote_folder))
    assert remote["metrics"] == local["metrics"] and remote["n_images"] == 6 and remote["dataset"] == "colours"
    images, captions = caption_set
    remote_images = _upload(s3_server, images, f"{s3_bucket}/imgs")
    remote_captions = _upload(s3_server, captions, f"{s3_bucket}/captions.json")
    local = _last_json(_invoke("retrieval", "--checkpoint", ckpt, "--images", images, "--captions", captions))
    remote = _last_json(_invoke("retrieval", "--checkpoint", ckpt, "--images", remote_images,
                                "--captions", remote_captions))
    assert remote["metrics"] == local["metrics"] and remote["n_captions"] == 6
