// The history of made images, kept in this browser's IndexedDB: each entry holds the
// image, the request that made it (fields, input images and mask as blobs) and what the
// server said about it (seed, size, stats), so that it can be shown, re-run or reopened.

const DB_NAME = "qis-playground";
const STORE = "images";

let opened = null;

function db() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => {
      const store = request.result.createObjectStore(STORE, { keyPath: "id", autoIncrement: true });
      store.createIndex("created", "created");
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

async function transaction(mode, work) {
  const database = await db();
  return new Promise((resolve, reject) => {
    const tx = database.transaction(STORE, mode);
    const result = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(result.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted"));
  });
}

// Store one entry ({created, tab, endpoint, fields, inputs, mask, image, seed, size, ...}); its new id.
export function addEntry(entry) {
  return transaction("readwrite", (store) => store.add({ created: Date.now(), ...entry }));
}

// Every entry, newest first.
export async function allEntries() {
  const entries = await transaction("readonly", (store) => store.getAll());
  return entries.sort((a, b) => b.created - a.created || b.id - a.id);
}

export function getEntry(id) {
  return transaction("readonly", (store) => store.get(id));
}

export function deleteEntry(id) {
  return transaction("readwrite", (store) => store.delete(id));
}

export function clearEntries() {
  return transaction("readwrite", (store) => store.clear());
}
