// The browser test: a real confab server, the demo page served from a static
// server on loopback, and two headless Chromium pages (Debian's /usr/bin/chromium
// driven by playwright-core; no browser is downloaded).
//
// Alice and Bob log in and exchange messages through the page. Alice goes
// offline (her socket closes), Bob sends 20 messages, Alice comes back: her page
// shows exactly those 20, once each, in order. A screenshot goes to
// test-output/browser.png.
//
// Env: SERVER_BIN (default ../../target/debug/confab), CHROMIUM (default /usr/bin/chromium).
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..");
const binary = process.env.SERVER_BIN ?? resolve(root, "../../target/debug/confab");
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const output = join(root, "test-output");
const STEP_TIMEOUT_MS = 15_000;

const cleanups = [];
function onCleanup(fn) {
  cleanups.unshift(fn);
}

/** Starts `confab serve` on loopback ports chosen by the OS; resolves with its WebSocket address. */
async function startServer() {
  const dataDir = mkdtempSync(join(tmpdir(), "confab-browser-"));
  onCleanup(() => rmSync(dataDir, { recursive: true, force: true }));
  const child = spawn(binary, ["serve"], {
    env: {
      ...process.env,
      CONFAB_SERVER__LISTEN: "127.0.0.1:0",
      CONFAB_SERVER__SHARDS: "2",
      CONFAB_SERVER__PIN_THREADS: "false",
      CONFAB_WEBSOCKET__LISTEN: "127.0.0.1:0",
      CONFAB_QUIC__ENABLED: "false",
      CONFAB_STORE__DATA_DIR: dataDir,
      CONFAB_AUTH__ARGON2_MEMORY_KIB: "1024",
      CONFAB_AUTH__ARGON2_ITERATIONS: "1",
      CONFAB_LOG__LEVEL: "warn",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const exited = new Promise((ok) => child.once("exit", ok));
  onCleanup(async () => {
    child.kill("SIGTERM");
    await exited;
  });
  const lines = createInterface({ input: child.stdout });
  return await withTimeout(
    new Promise((resolveAddr, reject) => {
      child.on("exit", (code) => reject(new Error(`confab exited with ${code} before listening`)));
      lines.on("line", (line) => {
        const match = /^websocket on (.+)$/.exec(line);
        if (match) resolveAddr(match[1]);
      });
    }),
    "the server to listen",
  );
}

/** Serves sdk/ts/example on 127.0.0.1 (port chosen by the OS). */
async function startStaticServer() {
  const base = join(root, "example");
  const types = { ".html": "text/html", ".js": "text/javascript", ".map": "application/json" };
  const server = createServer((request, response) => {
    const path = normalize(decodeURIComponent(new URL(request.url, "http://x").pathname));
    const file = join(base, path === "/" ? "index.html" : path);
    if (!file.startsWith(base)) {
      response.writeHead(403).end();
      return;
    }
    try {
      const body = readFileSync(file);
      response.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" }).end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  onCleanup(() => server.close());
  return `http://127.0.0.1:${server.address().port}`;
}

function withTimeout(promise, what, ms = STEP_TIMEOUT_MS) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    }),
  ]);
}

/** The message bodies a page shows, in order. */
async function bodies(page) {
  return page.$$eval("#messages li .body", (items) => items.map((item) => item.textContent));
}

async function waitForBodies(page, count, what) {
  await page.waitForFunction((n) => document.querySelectorAll("#messages li").length >= n, count, {
    timeout: STEP_TIMEOUT_MS,
  });
  return bodies(page);
}

async function signUpAndLogIn(page, site, ws, username) {
  await page.goto(`${site}/?server=${encodeURIComponent(ws)}`);
  await page.fill("#username", username);
  await page.fill("#password", "correct horse battery");
  await page.click("#signup");
  await page.waitForFunction(() => document.querySelector("#error").textContent.includes("signed up"), null, {
    timeout: STEP_TIMEOUT_MS,
  });
  await page.click("#login");
  await page.waitForSelector('#status[data-status="online"]', { timeout: STEP_TIMEOUT_MS });
}

async function open(page, peer) {
  await page.fill("#peer", peer);
  await page.click("#open");
  await page.waitForFunction((name) => document.querySelector("#conversation").textContent === `with ${name}`, peer, {
    timeout: STEP_TIMEOUT_MS,
  });
}

async function send(page, body) {
  const before = (await bodies(page)).length;
  await page.fill("#body", body);
  await page.click("#send");
  await waitForBodies(page, before + 1, `"${body}" to be acknowledged`);
}

async function main() {
  mkdirSync(output, { recursive: true });
  const ws = `ws://${await startServer()}/v1/ws`;
  const site = await startStaticServer();
  const userDataDir = mkdtempSync(join(tmpdir(), "confab-chromium-"));
  onCleanup(() => rmSync(userDataDir, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--disable-background-networking",
      "--disable-component-update",
      "--no-first-run",
      "--disable-sync",
    ],
  });
  onCleanup(() => context.close());
  const suffix = Date.now().toString(36);
  const [alice, bob] = [await context.newPage(), await context.newPage()];
  for (const page of [alice, bob]) page.on("pageerror", (error) => console.error("page error:", error));
  const aliceName = `alice${suffix}`;
  const bobName = `bob${suffix}`;
  await signUpAndLogIn(alice, site, ws, aliceName);
  await signUpAndLogIn(bob, site, ws, bobName);
  await open(alice, bobName);
  await open(bob, aliceName);

  await send(alice, "hi bob");
  assert.deepEqual(await waitForBodies(bob, 1, "bob to receive"), ["hi bob"]);
  await send(bob, "hi alice");
  assert.deepEqual(await waitForBodies(alice, 2, "alice to receive"), ["hi bob", "hi alice"]);
  console.log("ok - two pages exchange messages");

  await alice.click("#offline");
  await alice.waitForSelector('#status[data-status="offline"]', { timeout: STEP_TIMEOUT_MS });
  const missed = Array.from({ length: 20 }, (_, i) => `while you were away ${i + 1}`);
  for (const body of missed) await send(bob, body);
  assert.deepEqual(await bodies(alice), ["hi bob", "hi alice"], "nothing arrives while offline");
  await alice.click("#online");
  await alice.waitForSelector('#status[data-status="online"]', { timeout: STEP_TIMEOUT_MS });
  await waitForBodies(alice, 22, "the 20 missed messages");
  // A live message after the catch-up: any duplicate of the replay would arrive
  // before it (one conversation's pushes are ordered), so once it shows, the list
  // is final.
  await send(bob, "welcome back");
  await waitForBodies(alice, 23, "the live message after the catch-up");
  assert.deepEqual(
    await bodies(alice),
    ["hi bob", "hi alice", ...missed, "welcome back"],
    "exactly the 20, once each, in order",
  );
  const seqs = await alice.$$eval("#messages li", (items) => items.map((item) => Number(item.dataset.seq)));
  assert.deepEqual(seqs, Array.from({ length: 23 }, (_, i) => i + 1));
  console.log("ok - after reconnecting, the 20 missed messages show once each, in order");

  await alice.screenshot({ path: join(output, "browser.png"), fullPage: true });
  console.log(`screenshot: ${join(output, "browser.png")}`);
}

let failed = false;
try {
  await main();
} catch (error) {
  failed = true;
  console.error("not ok -", error);
} finally {
  for (const cleanup of cleanups) {
    try {
      await cleanup();
    } catch (error) {
      console.error("cleanup:", error);
    }
  }
}
process.exit(failed ? 1 : 0);
