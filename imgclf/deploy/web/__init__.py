"""`imgclf export RUN --format web`: a static folder that classifies in the browser, offline.

static/   the page (index.html, app.js), the model wrapper (classifier.js: decode, then
          the any-size graph of deploy/resize_graph.py resizes), the service worker
vendor/   ONNX Runtime Web's files, fetched from npm by `python -m imgclf.deploy.web.vendor`
          (run by `make setup`), never committed
"""
