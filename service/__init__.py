"""The training service: REST API, job store and runner, web page and the `sae` CLI."""
