"""The service's routes, one :class:`fastapi.APIRouter` module per resource.

:func:`service.app.create_app` includes them in this order (the order of the OpenAPI
document): :mod:`~service.routes.health`, :mod:`~service.routes.pages`,
:mod:`~service.routes.datasets`, :mod:`~service.routes.jobs`,
:mod:`~service.routes.artifacts`. Routes are thin: each parses its input, calls the store, the
runner, a service module or the job folder's layout, and returns.
"""
