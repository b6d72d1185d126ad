"""Scale-out on Ray Serve (the optional extra `teaserve[ray]`): the same HTTP API in front of several engine
replicas, each owning one model on one device. Only this package imports Ray, and only `teaserve serve --ray` and
Serve's own commands import this package."""
