"""``edge-upgrade-ctl``: applies NodeUpgradeJob manifests to a fleet and watches them.

Modules: ``manifest`` (the parsing gate), ``store`` (the durable job store),
``link`` (MQTT), ``rollout`` (selection, dispatch, timeouts, tolerance),
``view`` (table and status), ``report_html`` (the rollout report), ``cli``.
"""
