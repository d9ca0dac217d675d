// Ranking widget of the comparison page: drag and drop (mouse, pen, touch) and keyboard.
//
// The form's real fields are the per-response <select name="rank_P"> elements (1 = best, equal = tie);
// without JavaScript the labeler sets them directly. This script hides them, shows an ordered list of the
// responses instead, and after every change writes the list's order into the selects:
// ranks are dense, and a response marked "tied with the one above" gets that response's rank. The list
// starts in the order of the selects' ranks (the server's, or a draft's restored by drafts.js), and every
// change by the labeler is announced to the form as a "change" event, which drafts.js saves.
(function () {
  "use strict";

  function init() {
    var list = document.getElementById("ranking-list");
    if (!list) return;
    var form = list.closest("form");
    var status = document.getElementById("ranking-status");
    document.getElementById("ranking").hidden = false;
    form.querySelectorAll(".no-js-only").forEach(function (el) { el.hidden = true; });

    function rows() { return Array.prototype.slice.call(list.querySelectorAll(".rank-item")); }
    function tieBox(li) { return li.querySelector(".tie-box"); }
    function announce(text) { status.textContent = text; }

    function sync() {
      var rank = 0;
      rows().forEach(function (li, i) {
        var box = tieBox(li);
        if (i === 0) { box.checked = false; box.disabled = true; } else { box.disabled = false; }
        var tied = i > 0 && box.checked;
        if (!tied) rank += 1;
        li.querySelector(".rank-number").textContent = rank + ".";
        li.classList.toggle("tied", tied);
        li.setAttribute("aria-label", "Rank " + rank + ": response " + li.dataset.letter + (tied ? ", tied with the one above" : ""));
        var select = form.querySelector('select[name="rank_' + li.dataset.position + '"]');
        if (select) select.value = String(rank);
      });
    }

    // start from the ranks in the selects: sort by rank (stable, so ties keep their order), tie equal ranks
    function rankOf(li) { return Number(form.querySelector('select[name="rank_' + li.dataset.position + '"]').value); }
    rows().slice().sort(function (a, b) { return rankOf(a) - rankOf(b); }).forEach(function (li, i, sorted) {
      list.appendChild(li);
      tieBox(li).checked = i > 0 && rankOf(li) === rankOf(sorted[i - 1]);
    });

    function changed() {
      sync();
      form.dispatchEvent(new Event("change"));
    }

    function describe(li) { return "Response " + li.dataset.letter + " is now " + li.getAttribute("aria-label").toLowerCase(); }

    // ---- keyboard: Space/Enter picks up and drops, arrows move focus or the picked-up response, T ties
    var grabbed = null;
    function setGrabbed(li) {
      if (grabbed) grabbed.classList.remove("grabbed");
      grabbed = li;
      rows().forEach(function (r) { r.setAttribute("aria-grabbed", r === li ? "true" : "false"); });
      if (li) { li.classList.add("grabbed"); announce("Picked up response " + li.dataset.letter + ". Use the arrow keys to move it, Space to drop it."); }
    }
    function move(li, delta) {
      var other = delta < 0 ? li.previousElementSibling : li.nextElementSibling;
      if (!other) return;
      // move the neighbour rather than li itself: moving a focused element would blur it
      if (delta < 0) list.insertBefore(other, li.nextElementSibling); else list.insertBefore(other, li);
      tieBox(li).checked = false;  // a response placed explicitly starts its own rank
      changed();
      li.focus();
      announce(describe(li));
    }
    list.addEventListener("keydown", function (ev) {
      var li = ev.target.closest(".rank-item");
      if (!li || ev.target !== li) return;  // keys on the tie checkbox keep their usual meaning
      var key = ev.key;
      if (key === " " || key === "Spacebar" || key === "Enter") {
        ev.preventDefault();
        if (grabbed === li) { setGrabbed(null); announce("Dropped. " + describe(li)); } else { setGrabbed(li); }
      } else if (key === "ArrowUp" || key === "ArrowDown") {
        ev.preventDefault();
        var delta = key === "ArrowUp" ? -1 : 1;
        if (grabbed === li) {
          move(li, delta);
        } else {
          var next = delta < 0 ? li.previousElementSibling : li.nextElementSibling;
          if (next) next.focus();
        }
      } else if (key === "Escape" && grabbed) {
        ev.preventDefault();
        setGrabbed(null);
        announce("Dropped. " + describe(li));
      } else if (key === "t" || key === "T") {
        ev.preventDefault();
        var box = tieBox(li);
        if (!box.disabled) { box.checked = !box.checked; changed(); announce(describe(li)); }
      }
    });
    list.addEventListener("focusout", function (ev) {
      if (grabbed && ev.target === grabbed && !list.contains(ev.relatedTarget)) setGrabbed(null);
    });

    // ---- pointer: press on a response and drag it over the others
    var dragging = null;
    var moved = false;
    list.addEventListener("pointerdown", function (ev) {
      var li = ev.target.closest(".rank-item");
      if (!li || ev.button !== 0 || ev.target.closest("label.tie")) return;
      ev.preventDefault();  // no text selection while dragging
      dragging = li;
      moved = false;
      li.classList.add("dragging");
      li.focus();
    });
    document.addEventListener("pointermove", function (ev) {
      if (!dragging) return;
      var before = null;
      var others = rows().filter(function (r) { return r !== dragging; });
      for (var i = 0; i < others.length; i++) {
        var box = others[i].getBoundingClientRect();
        if (ev.clientY < box.top + box.height / 2) { before = others[i]; break; }
      }
      if (before !== dragging.nextElementSibling || (before === null && dragging !== list.lastElementChild)) {
        if (before) list.insertBefore(dragging, before); else list.appendChild(dragging);
        moved = true;
        sync();
      }
    });
    function endDrag() {
      if (!dragging) return;
      var li = dragging;
      dragging = null;
      li.classList.remove("dragging");
      if (moved) { tieBox(li).checked = false; changed(); announce(describe(li)); }
      li.focus();
    }
    document.addEventListener("pointerup", endDrag);
    document.addEventListener("pointercancel", endDrag);

    list.addEventListener("change", function (ev) { if (ev.target.classList.contains("tie-box")) sync(); });
    form.addEventListener("submit", sync);
    sync();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
