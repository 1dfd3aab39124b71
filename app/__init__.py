"""The application: the one wiring root (daemon + backfiller + publisher + admin API + metrics),
the admin API, the CLI -> daemon client and `lambda_handler`."""
