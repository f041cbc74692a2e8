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

//: What the history may hold: the newest entries are kept, the oldest deleted past either bound.
export const LIMITS = { entries: 500, bytes: 512 * 1024 * 1024 };

// The bytes an entry holds: its image, and the input images and mask of its request.
function entryBytes(entry) {
  return [entry.image, entry.mask, ...(entry.inputs || [])].reduce((sum, blob) => sum + (blob?.size || 0), 0);
}

// Delete the oldest entries until the rest fit `limits`.
async function prune(limits) {
  const entries = await allEntries();
  let bytes = 0;
  const over = entries.filter((entry, index) => (bytes += entryBytes(entry)) > limits.bytes || index >= limits.entries);
  if (!over.length) return;
  await transaction("readwrite", (store) => {
    for (const entry of over) store.delete(entry.id);
    return {};
  });
}

// Store one entry ({created, tab, endpoint, fields, inputs, mask, image, seed, size, ...}); its new id. The oldest
// entries go once the history is over its limits; when the browser's quota is reached, half of them, then it tries again.
export async function addEntry(entry, limits = LIMITS) {
  const record = { created: Date.now(), ...entry };
  let id;
  try {
    id = await transaction("readwrite", (store) => store.add(record));
  } catch (error) {
    if (error?.name !== "QuotaExceededError") throw error;
    const count = (await allEntries()).length;
    await prune({ entries: Math.floor(count / 2), bytes: Infinity });
    id = await transaction("readwrite", (store) => store.add(record));
  }
  await prune(limits);
  return id;
}

// Every entry, newest run first, a run's images in their order (its entries share its start time).
export async function allEntries() {
  const entries = await transaction("readonly", (store) => store.getAll());
  return entries.sort((a, b) => b.created - a.created || a.id - b.id);
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
