"""The one error type for security inputs that stop the server from starting (JWKS, policy, certificates, keys,
key providers); its message names the file or setting and the field, and `deepfleet serve` prints it and exits."""


class SecurityConfigError(ValueError):
    pass
