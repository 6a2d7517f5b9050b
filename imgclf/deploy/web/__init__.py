"""`imgclf export RUN --format web`: a static folder that classifies in the browser, offline.

static/   the page (index.html, app.js), the in-browser preprocessing (preprocess.js,
          a port of PIL's resize), the model wrapper (classifier.js), the service worker
vendor/   ONNX Runtime Web's files, fetched from npm by `python -m imgclf.deploy.web.vendor`
          (run by `make setup`), never committed
"""
