"""Reviewing flagged items: the review API's bodies (``schemas``) and what a review does
besides labelling (``actions``: an eval example, a blocklist term). The HTTP routes are
``gateway.routes.review``; the dashboard's review page uses ``actions`` too."""
