"""Ray Serve surfaces of rayprune: the compression job service and a generation endpoint.

App builders (for ``serve run`` and RayService serve configs):

- ``orchestrator.surfaces.serve.app:build_app``: the job service (``/v1/jobs``); args ``root`` (or
  ``$RAYPRUNE_SERVE_ROOT``), ``token_file``, ``job_num_cpus``, ``max_active_jobs``,
  ``max_finished_jobs``, ``cancel_grace_s``, ``max_body_bytes``, ``num_replicas``, ``policy_file``
  (what submitted jobs may do: :mod:`orchestrator.surfaces.serve.policy`).
- ``orchestrator.surfaces.serve.generate:build_app``: greedy text generation (``/v1/generate``) from a
  checkpoint or run directory; args ``model_dir``, ``token_file``, ``dtype``,
  ``max_new_tokens_limit``, ``max_body_bytes``, ``num_cpus``, ``num_replicas``.

Both refuse to start without a bearer token (``$RAYPRUNE_SERVE_TOKEN``, or a file named by
``$RAYPRUNE_SERVE_TOKEN_FILE`` or ``token_file``). :mod:`orchestrator.surfaces.serve.client` is a small
standard-library client.
"""
