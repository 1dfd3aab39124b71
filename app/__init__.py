"""The application layer: what joins the parts below it (consumer, backfill, publish) into programs.

    application  the one wiring root: `Application` / `serve` (daemon + backfiller + publisher +
                 verifier + admin API + metrics), what `skyfill consume` runs
    settings     `Settings` and the builders from flat options (`daemon_settings`), `DEFAULT_DB`
    jobs         one-shot work: `run_gaps`, `run_backfill`, `all_dids`, the daemon's repair round,
                 the Kafka sink and backfill worker
    commands     `status` / `gaps` / `backfill`: through a running daemon, or on the file
    routes, api  the admin API's routes and their typed JSON requests
    admin, daemon_client   the admin API server, and finding / calling it from another process
    handler      `lambda_handler`
"""
