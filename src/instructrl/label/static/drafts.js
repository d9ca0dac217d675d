// Drafts of the task forms, kept in the browser so that typed work survives an expired login, a crash or a
// closed tab.
//
// Every form with a data-draft attribute ("username:assignment") saves its visible fields (text, ranks,
// scores, flags, skip reason and note; not the hidden csrf/submission fields) to localStorage on every
// change and when it is submitted, and restores them when the page is opened again. The page that follows
// a successful submission names the stored assignment in <meta name="instructrl-stored">, and its drafts
// are removed then. This script runs before rank.js, which orders its list from the restored rank fields.
(function () {
  "use strict";
  var PREFIX = "instructrl-draft:";

  function storage() {
    try { return window.localStorage; } catch (e) { return null; }  // disabled storage: no drafts
  }
  function keyOf(form) { return PREFIX + form.dataset.draft + ":" + form.id; }
  function fields(form) {
    return Array.prototype.filter.call(form.elements, function (el) {
      return el.name && el.type !== "hidden" && el.type !== "submit" && el.type !== "button";
    });
  }

  function save(form) {
    var values = {};
    fields(form).forEach(function (el) {
      if (!(el.name in values)) values[el.name] = [];
      if ((el.type !== "checkbox" && el.type !== "radio") || el.checked) values[el.name].push(el.value);
    });
    try { storage().setItem(keyOf(form), JSON.stringify(values)); } catch (e) { /* full or disabled */ }
  }

  function restore(form) {
    var saved = null;
    try { saved = JSON.parse(storage().getItem(keyOf(form)) || "null"); } catch (e) { saved = null; }
    if (!saved) return;
    fields(form).forEach(function (el) {
      var values = saved[el.name];
      if (!values) return;
      if (el.type === "checkbox" || el.type === "radio") el.checked = values.indexOf(el.value) >= 0;
      else if (values.length) el.value = values[0];
    });
    var details = form.closest("details");  // the skip form: show a restored reason or note
    if (details && fields(form).some(function (el) { return el.value; })) details.open = true;
  }

  function init() {
    var store = storage();
    if (!store) return;
    document.querySelectorAll('meta[name="instructrl-stored"]').forEach(function (meta) {
      var stored = PREFIX + meta.content + ":";
      for (var i = store.length - 1; i >= 0; i--) {
        var key = store.key(i);
        if (key && key.indexOf(stored) === 0) store.removeItem(key);
      }
    });
    document.querySelectorAll("form[data-draft]").forEach(function (form) {
      restore(form);
      ["input", "change", "submit"].forEach(function (type) {
        form.addEventListener(type, function () { save(form); });
      });
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
