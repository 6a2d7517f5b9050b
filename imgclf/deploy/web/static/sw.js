// Service worker: cache-first for every file of the export, so the page, the
// model and ONNX Runtime's wasm load with no connection after the first visit.
// VERSION (a hash of the files) and FILES are written above by `imgclf export`.
const CACHE = `imgclf:${self.registration.scope}:${VERSION}`;

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((c) => c.addAll(FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  const mine = `imgclf:${self.registration.scope}:`; // older versions of this folder only
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k.startsWith(mine) && k !== CACHE).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", (event) => {
  if (event.request.method !== "GET") return;
  event.respondWith(caches.open(CACHE)
    .then((c) => c.match(event.request, { ignoreSearch: true }))
    .then((hit) => hit || fetch(event.request)));
});
