"""`argen serve`: a local web page to sample from a GPT pipeline and compare it with unCLIP priors side by side.

Parts: `settings` (the form's fields and the checked job request), `jobs` (the queue and its worker thread),
`page` (the HTML, CSS and JS), `app` (the Starlette routes; needs the `argen[serve]` extra).
"""
