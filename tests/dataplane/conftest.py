"""The data-plane tests' fixtures: one service for each module that asks for
`service` (see dataplane_support.shared_service_fixtures). Such a module runs
its tests on the module's event loop:
`pytestmark = pytest.mark.asyncio(loop_scope="module")`."""

from __future__ import annotations

from dataplane_support import shared_service_fixtures

service, channel = shared_service_fixtures()
