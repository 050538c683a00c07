// agentloop pages: confirmations, and the live updates of the run page and the runs list.
// Served from /static (the Content-Security-Policy allows no inline script).
// Every HTML fragment inserted here was rendered and escaped by the server.
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  // Fetches urlFor() as JSON, `pause` ms after the page loads and then as
  // onData(data) says: it returns the wait before the next fetch, or null to stop.
  // A failed fetch calls onTrouble() and is tried again after a wait that doubles
  // up to `maxWait`. A hidden tab fetches nothing until it is shown again.
  function pollJson(urlFor, pause, maxWait, onData, onTrouble) {
    var failures = 0;
    var dueWhileHidden = false;

    function poll() {
      if (document.hidden) {
        dueWhileHidden = true;
        return;
      }
      fetch(urlFor(), { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) {
            throw new Error("HTTP " + response.status);
          }
          return response.json();
        })
        .then(function (data) {
          failures = 0;
          var wait = onData(data);
          if (wait !== null) {
            window.setTimeout(poll, wait);
          }
        })
        .catch(function () {
          failures += 1;
          onTrouble();
          window.setTimeout(poll, Math.min(maxWait, pause * Math.pow(2, failures)));
        });
    }

    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && dueWhileHidden) {
        dueWhileHidden = false;
        poll();
      }
    });
    window.setTimeout(poll, pause);
  }

  function follow(root) {
    var url = root.getAttribute("data-live-url");
    var after = root.getAttribute("data-after") || "0";
    var state = root.getAttribute("data-state") || "";
    var pause = parseInt(root.getAttribute("data-poll"), 10) || 1000;
    var timeline = document.getElementById("timeline");
    var frozen = /[?&]before=/.test(window.location.search);
    var failures = 0;

    function indicator(text) {
      var live = document.getElementById("live");
      if (live) {
        live.textContent = text;
      }
    }

    function replaceSections(sections) {
      Object.keys(sections).forEach(function (name) {
        var section = document.getElementById(name);
        if (section) {
          section.innerHTML = sections[name];
        }
      });
    }

    // New events come as whole iteration groups. A group of the iteration the
    // timeline ends with replaces that group (it was sent again with its new
    // events); any other group is appended. A page showing an earlier stretch of
    // the timeline (?before=) keeps that stretch and updates only the sections.
    function mergeGroups(html) {
      if (!html.trim() || frozen) {
        return;
      }
      var holder = document.createElement("template");
      holder.innerHTML = html;
      Array.prototype.slice.call(holder.content.children).forEach(function (group) {
        var last = timeline.lastElementChild;
        var iteration = group.getAttribute("data-iteration");
        if (last && iteration !== null && last.getAttribute("data-iteration") === iteration) {
          var open = last.querySelector("details[open]");
          var details = group.querySelector("details");
          if (open && details) {
            details.open = true;
          }
          timeline.replaceChild(group, last);
        } else {
          timeline.appendChild(group);
        }
      });
    }

    function apply(data) {
      if (data.events) {
        mergeGroups(data.events);
      }
      after = String(data.last_event);
      if (data.sections) {
        replaceSections(data.sections);
        state = data.state;
      }
      root.setAttribute("data-status", data.status);
      root.setAttribute("data-after", after);
      return !data.terminal || data.more;
    }

    function urlFor() {
      return url + "?after=" + encodeURIComponent(after) + "&state=" + encodeURIComponent(state);
    }

    function onData(data) {
      if (apply(data)) {
        return data.more ? 0 : pause; // more new events than one update carries: at once
      }
      indicator("finished");
      return null;
    }

    pollJson(urlFor, pause, 30000, onData, function () {
      indicator("reconnecting…");
    });
  }

  // The runs list: re-rendered by the server when a run, a count or the no-worker
  // warning changed (and now and then, so ages move). Without JavaScript the page
  // is the same list, as of its loading.
  function followList(root) {
    var url = root.getAttribute("data-live-url");
    var state = root.getAttribute("data-state") || "";
    var pause = parseInt(root.getAttribute("data-poll"), 10) || 3000;
    var section = document.getElementById("runs-section");
    var live = document.getElementById("list-live");
    var separator = url.indexOf("?") === -1 ? "?" : "&";

    function urlFor() {
      return url + separator + "state=" + encodeURIComponent(state);
    }

    function onData(data) {
      live.textContent = "live";
      if (data.html !== undefined) {
        section.innerHTML = data.html;
      }
      state = data.state;
      root.setAttribute("data-state", state);
      return pause;
    }

    live.hidden = false;
    pollJson(urlFor, pause, 60000, onData, function () {
      live.textContent = "reconnecting…";
    });
  }

  // A flash about the decision just made ("The run resumes.") stops being true
  // when the live page sees the run end: take it away then.
  function dropFlashesWhenTheRunEnds(run) {
    var observer = new MutationObserver(function () {
      var status = run.getAttribute("data-status");
      if (["queued", "running", "paused"].indexOf(status) === -1) {
        document.querySelectorAll(".flash:not(.flash-error)").forEach(function (flash) {
          flash.remove();
        });
        observer.disconnect();
      }
    });
    observer.observe(run, { attributes: true, attributeFilter: ["data-status"] });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var run = document.getElementById("run");
    if (run && run.getAttribute("data-active") === "1") {
      follow(run);
      dropFlashesWhenTheRunEnds(run);
    }
    var list = document.getElementById("runs-list");
    if (list) {
      followList(list);
    }
  });
})();
