"""The shipped test kit: the real servers and stand-ins the agent is tested against.

Used by ``tests/``, the rehearsal (``scripts/rehearsal.py``, run by
``scripts/demo.sh``) and the benchmarks in ``bench/``, the way
``structlog.testing`` ships with structlog. It lives in the source tree only:
the wheel installed on edge nodes holds ``agent`` alone
(``[tool.setuptools.packages.find]`` in ``pyproject.toml``).

- ``testkit.broker``: a throwaway Mosquitto 2.0 with mutual TLS and the
  production ACL; ``testkit.pki`` generates its CA and certificates.
- ``testkit.cloud``: the controller side of MQTT (publishes commands,
  collects reports).
- ``testkit.dockerenv``: a private dockerd and a docker-registry with
  htpasswd auth, and installation-package images for them.
- ``testkit.standins``: stand-in ``edgecore`` and ``keadm`` programs and a
  sandboxed node to run them in.
- ``testkit.kubeedge_real``: the real KubeEdge binaries from
  ``../shared/kubeedge``, unpacked into a cache.
- ``testkit.e2e_host``: a Debian host with systemd as PID 1, in a container,
  for the end-to-end tests and ``bench/real_upgrade.py``.
- ``testkit.containerdenv``: a private containerd, and CRI's ``ImageStatus``
  asked as keadm asks it; ``testkit.oci`` builds and pushes images (multi-arch
  indexes too) without Docker.
- ``testkit.arm64_host``: an arm64 Debian under qemu-user emulation, as a
  chroot or with systemd as PID 1.
- ``testkit.fakes``: in-process fakes (service manager, image backend,
  transport, node) for the inner test ring.
"""
