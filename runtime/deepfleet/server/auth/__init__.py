"""Security of the HTTP server, as one ASGI middleware in front of every route: JWT authentication against a
JWKS file (`tokens`), RBAC/ABAC authorization from a policy file (`policy`, `actions`), per-principal token-bucket
rate limits (`ratelimit`), and a JSON-lines audit log (`audit`); `admin` holds the model_admin/auditor routes.
Endpoint code never checks a token: the middleware has decided before a route runs."""
