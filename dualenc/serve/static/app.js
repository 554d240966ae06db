// The search page: text, a dropped or pasted image, or "more like this" -> POST /v1/search, results as a grid.
"use strict";
(() => {
  const TOP_K = 24;
  const KEY_STORAGE = "dualenc-api-key";
  const $ = (id) => document.getElementById(id);
  const form = $("search"), text = $("q"), file = $("file"), drop = $("drop"), keyBox = $("keybox"), key = $("key");
  const error = $("error"), statusText = $("status-text"), queryImage = $("query-image"), grid = $("results");
  let latest = 0;  // the newest search: answers to older ones are dropped

  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, key.value));

  fetch("/healthz").then((r) => r.json()).then((health) => {
    $("model").textContent = health.model ? `model ${health.model}` : "";
    if (health.api_key) keyBox.hidden = false;
    if (!health.index) showError("This service has no index to search (start it with --index).");
  }).catch(() => {});

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
  }

  async function search(query, described, image) {
    const mine = ++latest;
    error.hidden = true;
    queryImage.hidden = !image;
    if (image) queryImage.src = image;
    statusText.textContent = `Searching for ${described}…`;
    document.body.dataset.busy = "true";
    const headers = { "Content-Type": "application/json" };
    if (key.value) headers.Authorization = `Bearer ${key.value}`;
    try {
      const response = await fetch("/v1/search", { method: "POST", headers, body: JSON.stringify({ query, top_k: TOP_K }) });
      const answer = await response.json().catch(() => null);
      if (mine !== latest) return;
      if (!response.ok) {
        if (response.status === 401) keyBox.hidden = false;
        throw new Error(answer && answer.error ? answer.error.message : `the server answered ${response.status}`);
      }
      show(answer.results);
      statusText.textContent = `${answer.results.length} results for ${described}`;
    } catch (e) {
      if (mine !== latest) return;
      statusText.textContent = "";
      showError(e.message);
    } finally {
      if (mine === latest) {
        document.body.dataset.busy = "false";
        document.body.dataset.searches = String(mine);
      }
    }
  }

  function show(results) {
    grid.replaceChildren(...results.map((result) => {
      const item = document.createElement("li");
      item.dataset.name = result.name;
      item.dataset.score = result.score;
      const picture = document.createElement("img");
      picture.src = result.thumbnail;
      picture.alt = result.name;
      picture.loading = "lazy";
      const name = document.createElement("p");
      name.className = "name";
      name.textContent = result.name;
      const score = document.createElement("p");
      score.className = "score";
      score.textContent = `#${result.rank} · score ${result.score.toFixed(3)}`;
      const more = document.createElement("button");
      more.type = "button";
      more.className = "more";
      more.textContent = "More like this";
      more.setAttribute("aria-label", `More like ${result.name}`);
      more.addEventListener("click", () => search({ item: result.name }, `images like ${result.name}`, result.thumbnail));
      item.append(picture, name, score, more);
      return item;
    }));
  }

  function searchFile(picked) {
    if (!picked) return;
    if (!picked.type.startsWith("image/")) {
      showError(`${picked.name || "that file"} is not an image`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => search({ image: reader.result }, `the image ${picked.name || "pasted"}`, reader.result);
    reader.onerror = () => showError(`cannot read ${picked.name || "the image"}`);
    reader.readAsDataURL(picked);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = text.value.trim();
    if (query) search({ text: query }, `“${query}”`);
  });
  file.addEventListener("change", () => { searchFile(file.files[0]); file.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) drop.classList.remove("over"); });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFile(event.dataTransfer && event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const picked = [...(event.clipboardData ? event.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (picked) {
      event.preventDefault();
      searchFile(picked);
    }
  });
})();
