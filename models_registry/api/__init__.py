"""The registry's REST API: serializers, views, routes, permissions, throttles and the upload handler."""
