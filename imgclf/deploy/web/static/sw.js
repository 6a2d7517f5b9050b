// Service worker: cache-first for every file of the export, so the page, the
// model and ONNX Runtime's wasm load with no connection after the first visit.
// VERSION (a hash of the files) and FILES are written above by `imgclf export`.
const CACHE = `imgclf:${self.registration.scope}:${VERSION}`;

self.addEventListener("install", (event) => {
  // cache: "reload": from the server, not the browser's HTTP cache, which may
  // still hold an earlier export's model under the same URL.
  const fresh = FILES.map((url) => new Request(url, { cache: "reload" }));
  event.waitUntil(caches.open(CACHE).then((c) => c.addAll(fresh)).then(() => self.skipWaiting()));
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
