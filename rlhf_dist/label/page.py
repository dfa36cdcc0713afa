"""The labelling page: plain HTML and a little JavaScript, no build step. It talks to rlhf_dist.label.app's JSON API.

Keys: left arrow or A = left is better, right arrow or L = right is better, down arrow or T = tie, S = skip,
U or Backspace = undo the last judgement, N = write a note (Esc leaves the note box). `body[data-state]` is
"ready" when a pair is shown and keys are taken, "busy" while a request is out, "done" / "waiting" / "name".
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rlhf-dist label</title>
<style>
  body { font: 16px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { display: flex; justify-content: space-between; align-items: center; padding: 10px 24px;
           background: #1d2330; color: #fff; }
  header b { font-weight: 600; }
  main { max-width: 1100px; margin: 20px auto; padding: 0 24px; }
  .prompt { background: #fff; border-radius: 8px; padding: 14px 18px; margin-bottom: 16px;
            border-left: 4px solid #5a6acf; }
  .label { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: #6b7280; }
  .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
  .answer { background: #fff; border-radius: 8px; padding: 14px 18px; min-height: 90px; border: 2px solid #fff; }
  .answer > div:last-child { white-space: pre-wrap; margin-top: 4px; }
  .answer.picked { border-color: #2f9e44; }
  .buttons { display: flex; gap: 10px; margin: 16px 0; flex-wrap: wrap; }
  button { font: inherit; padding: 8px 14px; border-radius: 6px; border: 1px solid #c4c8d0; background: #fff;
           cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  kbd { font: 12px ui-monospace, monospace; border: 1px solid #c4c8d0; border-radius: 3px; padding: 0 4px;
        background: #f4f5f7; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; padding: 8px; border-radius: 6px;
             border: 1px solid #c4c8d0; min-height: 48px; }
  #status { min-height: 1.4em; color: #6b7280; }
  #status.error { color: #c92a2a; }
  .hidden { display: none; }
  progress { width: 220px; vertical-align: middle; }
</style>
</head>
<body data-state="loading">
<header>
  <div><b>rlhf-dist label</b> &middot; which answer is better?</div>
  <div id="progress-text"></div>
  <div>labeller: <b id="who">&mdash;</b></div>
</header>
<main>
  <form id="name-form" class="hidden">
    <p>Your labeller name (letters, digits, <code>_ . -</code>):</p>
    <input id="name" autocomplete="off" pattern="[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}" required>
    <button type="submit">Start</button>
  </form>
  <section id="task" class="hidden">
    <div class="prompt"><div class="label">prompt</div><div id="prompt"></div></div>
    <div class="answers">
      <div class="answer" id="left-box"><div class="label">left &larr;</div><div id="left"></div></div>
      <div class="answer" id="right-box"><div class="label">right &rarr;</div><div id="right"></div></div>
    </div>
    <div class="buttons">
      <button id="b-left" data-choice="left"><kbd>&larr;</kbd> / <kbd>A</kbd> left is better</button>
      <button id="b-right" data-choice="right"><kbd>&rarr;</kbd> / <kbd>L</kbd> right is better</button>
      <button id="b-tie" data-choice="tie"><kbd>&darr;</kbd> / <kbd>T</kbd> tie</button>
      <button id="b-skip" data-choice="skip"><kbd>S</kbd> skip</button>
      <button id="b-undo"><kbd>U</kbd> undo last</button>
    </div>
    <textarea id="note" placeholder="optional note (N to write, Esc to leave)"></textarea>
  </section>
  <p id="status"></p>
  <p><progress id="bar" value="0" max="1"></progress></p>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let who = new URLSearchParams(location.search).get("labeller") || localStorage.getItem("rlhf_label_labeller");
let pair = null;

function setState(s) { document.body.dataset.state = s; }
function status(text, error) { $("status").textContent = text || ""; $("status").className = error ? "error" : ""; }

async function api(path, body) {
  const opts = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: r.status + " " + r.statusText }));
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function show(view) {
  const p = view.progress;
  $("progress-text").textContent =
    `you: ${p.mine} judged` + (p.skipped ? `, ${p.skipped} skipped` : "") +
    ` \\u00b7 all: ${p.labelled} of ${p.total} pairs labelled` + (p.more_coming ? " (more coming)" : "");
  $("bar").max = Math.max(1, p.total); $("bar").value = p.labelled;
  $("b-undo").disabled = !view.can_undo;
  pair = view.pair;
  document.body.dataset.pairId = pair ? pair.pair_id : "";
  document.body.dataset.judged = p.mine + p.skipped;
  if (view.error) status(view.error, true);
  if (!pair) {
    $("task").classList.add("hidden");
    if (view.waiting) { setState("waiting"); status("sampling more pairs\\u2026"); setTimeout(load, 1000); }
    else { setState("done"); status("No pairs left for you: thank you!"); }
    return;
  }
  $("task").classList.remove("hidden");
  $("prompt").textContent = pair.prompt;
  $("left").textContent = pair.left;
  $("right").textContent = pair.right;
  $("left-box").classList.remove("picked"); $("right-box").classList.remove("picked");
  $("note").value = view.note || "";
  setState("ready");
}

async function run(step) {
  setState("busy");
  try { show(await step()); if (!$("status").classList.contains("error")) status(""); }
  catch (e) { status(e.message, true); setState(pair ? "ready" : "done"); }
}

function load() { return run(() => api("/api/next?labeller=" + encodeURIComponent(who))); }

function judge(choice) {
  if (document.body.dataset.state !== "ready" || !pair) return;
  if (choice === "left" || choice === "right") $(choice + "-box").classList.add("picked");
  const note = $("note").value;
  return run(() => api("/api/judge", { labeller: who, pair_id: pair.pair_id, choice, note }));
}

function undo() {
  if (!["ready", "done"].includes(document.body.dataset.state) || $("b-undo").disabled) return;
  return run(() => api("/api/undo", { labeller: who }));
}

const KEYS = { ArrowLeft: "left", a: "left", ArrowRight: "right", l: "right", ArrowDown: "tie", t: "tie", s: "skip" };
document.addEventListener("keydown", (e) => {
  if (e.target === $("note") || e.target === $("name")) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  if (KEYS[key]) { e.preventDefault(); judge(KEYS[key]); }
  else if (key === "u" || key === "Backspace") { e.preventDefault(); undo(); }
  else if (key === "n") { e.preventDefault(); $("note").focus(); }
});
for (const b of document.querySelectorAll("button[data-choice]")) b.onclick = () => judge(b.dataset.choice);
$("b-undo").onclick = undo;
$("name-form").onsubmit = (e) => {
  e.preventDefault(); who = $("name").value.trim();
  localStorage.setItem("rlhf_label_labeller", who); start();
};

function start() {
  if (!who) { setState("name"); $("name-form").classList.remove("hidden"); $("name").focus(); return; }
  $("name-form").classList.add("hidden");
  $("who").textContent = who;
  load();
}
start();
</script>
</body>
</html>
"""
