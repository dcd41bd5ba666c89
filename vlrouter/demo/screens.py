"""Synthetic UI screenshots for the four demo tasks, written as adapter datasets.

Each task draws its own kind of screen with PIL alone (text uses Pillow's bundled
font, so no system font is read):

* ``calendar``        -- month views, and date-picker popups over a form;
* ``claim-window``    -- an insurance-claim dialog: labelled fields, a claim-type
  radio group, Submit / Save draft / Cancel;
* ``provider-select`` -- a searchable list of doctors, each row with a Select button;
* ``settings-toggle`` -- a settings page of labelled toggle switches.

A sample pairs a screenshot with an instruction and the single action that carries it
out: ``click(x=.., y=..)`` at the integer centre of the drawn target, or
``type(text="..")`` into an empty field (the click on the field is implied). About
:data:`GENERIC_RATE` of the samples take their instruction from the small shared
:data:`GENERIC_INSTRUCTIONS` pool ("Press the blue button"); those words come with
screens of every task, so only the image tells a router which adapter should act.

Everything is drawn from a seeded ``random.Random``: one seed gives byte-identical
PNGs and JSONL, and sample ``i`` does not depend on how many samples are written.
"""

from __future__ import annotations

import calendar as _calendar
import datetime
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

from vlrouter.core.errors import InputError, located

TASKS: tuple[str, ...] = ("calendar", "claim-window", "provider-select", "settings-toggle")

#: Share of samples whose instruction comes from the shared, task-agnostic pool.
GENERIC_RATE = 0.2

# What each generic instruction asks for; every task's renderer can stage all three.
_GENERIC: dict[str, tuple[str, ...]] = {
    "highlighted": ("Click the highlighted item", "Select the highlighted option"),
    "blue": ("Press the blue button", "Click the blue button"),
    "first": ("Select the first option", "Click the first item"),
}
GENERIC_INSTRUCTIONS: tuple[str, ...] = tuple(text for texts in _GENERIC.values() for text in texts)

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1: inclusive pixel bounds, as PIL draws them


@dataclass(frozen=True)
class Sample:
    """One screenshot, its instruction and the action that carries it out.

    ``action`` is ``click(x=.., y=..)`` or ``type(text="..")``. ``target`` is the drawn
    box of the element acted on (a click hits its integer centre; ``type`` goes into
    that field); samples built by hand may leave it out.
    """

    id: str
    task: str
    image: Image.Image
    instruction: str
    action: str
    target: Box | None = None


# --------------------------------------------------------------------------- drawing

WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
#: The one colour that "the blue button" means; scenes staged for it use no other blue.
BLUE: RGB = (37, 99, 235)
_ACCENTS: dict[str, RGB] = {
    "blue": BLUE,
    "indigo": (79, 70, 229),
    "teal": (13, 148, 136),
    "purple": (147, 51, 234),
    "red": (220, 38, 38),
    "orange": (234, 88, 12),
    "green": (22, 163, 74),
    "pink": (219, 39, 119),
}
_NOT_BLUE = ("red", "orange", "green", "pink")
# Avatars and setting icons: colourful but never blue, so they cannot pass for "the blue button".
_ICON_COLOURS: tuple[RGB, ...] = tuple(_ACCENTS[name] for name in ("teal", "purple") + _NOT_BLUE)


def _accent(rng: random.Random, blue_ok: bool) -> RGB:
    return _ACCENTS[rng.choice(tuple(_ACCENTS) if blue_ok else _NOT_BLUE)]


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    """``a`` moved a fraction ``t`` of the way towards ``b``."""
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _jitter(rng: random.Random, colour: RGB, amount: int = 6) -> RGB:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in colour)  # type: ignore[return-value]


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (its fixed-size bitmap font before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: load_default() takes no size
        return ImageFont.load_default()


@cache
def _cap_middle(size: int) -> float:
    """Distance from the text origin down to the middle of a capital letter."""
    _, top, _, bottom = _font(size).getbbox("H")
    return (top + bottom) / 2


def _text_width(text: str, size: int) -> int:
    return math.ceil(_font(size).getlength(text))


class _Canvas:
    """An RGB image, a drawing context, and the boxes of keyed elements drawn so far."""

    def __init__(self, width: int, height: int, background: RGB) -> None:
        self.image = Image.new("RGB", (width, height), background)
        self.draw = ImageDraw.Draw(self.image)
        self.boxes: dict[object, Box] = {}

    def text(self, x: float, y: float, text: str, size: int, fill: RGB, align: str = "l") -> None:
        """Draw ``text`` with capitals centred on ``y``; ``x`` is its left, middle or right (``align``)."""
        shift = {"l": 0.0, "m": 0.5, "r": 1.0}[align] * _font(size).getlength(text)
        self.draw.text((round(x - shift), round(y - _cap_middle(size))), text, font=_font(size), fill=fill)

    def box(self, box: tuple[float, float, float, float], fill: RGB | None, outline: RGB | None = None,
            radius: int = 0, width: int = 1, key: object = None) -> Box:
        """Draw a (rounded) rectangle; record its integer box under ``key`` when given."""
        x0, y0, x1, y1 = (round(v) for v in box)
        if radius:
            self.draw.rounded_rectangle((x0, y0, x1, y1), radius=radius, fill=fill, outline=outline, width=width)
        else:
            self.draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=width)
        if key is not None:
            self.boxes[key] = (x0, y0, x1, y1)
        return x0, y0, x1, y1

    def ellipse(self, box: tuple[float, float, float, float], fill: RGB | None, outline: RGB | None = None,
                key: object = None) -> Box:
        """Draw an ellipse inside ``box``; record the box under ``key`` when given."""
        x0, y0, x1, y1 = (round(v) for v in box)
        self.draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline)
        if key is not None:
            self.boxes[key] = (x0, y0, x1, y1)
        return x0, y0, x1, y1

    def button(self, box: tuple[float, float, float, float], label: str, size: int, fill: RGB, fg: RGB,
               outline: RGB | None = None, radius: int = 4, key: object = None) -> Box:
        x0, y0, x1, y1 = drawn = self.box(box, fill, outline, radius, key=key)
        self.text((x0 + x1) / 2, (y0 + y1) / 2, label, size, fg, "m")
        return drawn

    def chevron(self, box: Box, direction: int, fill: RGB) -> None:
        """A ``<`` (direction -1) or ``>`` (+1) drawn with lines, centred in ``box``."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        arm = max(3, (box[3] - box[1]) // 5)
        tip = cx + direction * arm / 2
        self.draw.line([(tip - direction * arm, cy - arm), (tip, cy), (tip - direction * arm, cy + arm)],
                       fill=fill, width=2)

    def switch(self, box: tuple[float, float, float, float], on: bool, on_fill: RGB, off_fill: RGB,
               knob: RGB, key: object = None) -> Box:
        """A pill-shaped toggle; the knob sits right when ``on``."""
        height = round(box[3]) - round(box[1])
        x0, y0, x1, y1 = drawn = self.box(box, on_fill if on else off_fill, radius=height // 2, key=key)
        d = height - 4
        kx = x1 - 2 - d if on else x0 + 2
        self.draw.ellipse((kx, y0 + 2, kx + d, y0 + 2 + d), fill=knob)
        return drawn

    def star(self, cx: float, cy: float, r: float, fill: RGB) -> None:
        points = []
        for i in range(10):
            angle = -math.pi / 2 + i * math.pi / 5
            radius = r if i % 2 == 0 else r * 0.45
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        self.draw.polygon(points, fill=fill)


def _click(box: Box) -> str:
    return f"click(x={(box[0] + box[2]) // 2}, y={(box[1] + box[3]) // 2})"


def _type(text: str) -> str:
    return f'type(text="{text}")'


class _Scene(NamedTuple):
    image: Image.Image
    instruction: str
    action: str
    target: Box


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
_FIRST_NAMES = ("Alice", "Omar", "Priya", "Daniel", "Mei", "Carlos", "Fatima", "John", "Grace", "Luis",
                "Hannah", "Kenji", "Sara", "Victor", "Amara", "Elena", "Noah", "Ruth", "Tomas", "Yara")
_LAST_NAMES = ("Smith", "Patel", "Nguyen", "Garcia", "Okafor", "Chen", "Kowalski", "Haddad", "Johnson", "Rossi",
               "Tanaka", "Mendes", "Larsen", "Brown", "Ibrahim", "Novak", "Silva", "Murphy", "Kim", "Weber")


def _nth(n: int) -> str:
    """1 -> '1st', 22 -> '22nd', 13 -> '13th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# -------------------------------------------------------------------------- calendar

_MONTHS = tuple(_calendar.month_name)[1:]
_DAY_NAMES = tuple(_calendar.day_name)  # Monday first, as date.weekday() counts


class _Month(NamedTuple):
    """What a calendar screen shows, shared by the month-view and date-picker layouts."""

    year: int
    month: int
    weeks: list[list[datetime.date]]  # seven days a week, neighbouring months' days included
    selected: int | None  # highlighted day of the month
    has_today: bool  # a "Today" button next to the arrows
    blue_today: bool  # that button is the screen's only blue thing
    accent: RGB
    dark: bool


def _render_calendar(rng: random.Random, w: int, h: int, generic: str | None) -> _Scene:
    year, month = rng.randint(2019, 2028), rng.randint(1, 12)
    days = _calendar.monthrange(year, month)[1]
    name = _MONTHS[month - 1]
    selected = rng.randint(1, days) if rng.random() < 0.7 else None
    has_today = rng.random() < 0.6

    key: object
    if generic:
        instruction = rng.choice(_GENERIC[generic])
        if generic == "highlighted":
            selected = selected or rng.randint(1, days)
            key = ("day", selected)
        elif generic == "blue":
            has_today, key = True, "today"
        else:
            key = ("day", 1)
    else:
        kind = rng.choices(("day", "weekday", "selected", "nav", "today"), weights=(45, 15, 12, 18, 10))[0]
        if kind == "day":
            d = rng.randint(1, days)
            key = ("day", d)
            instruction = rng.choice((f"Click {name} {d} in the calendar", f"Select {name} {d}",
                                      f"Choose the {_nth(d)} of {name}", f"Select the {_nth(d)}",
                                      f"Pick {name} {d}, {year}", f"Click on day {d}"))
        elif kind == "weekday":
            wd = rng.randrange(7)
            matching = [d for d in range(1, days + 1) if _calendar.weekday(year, month, d) == wd]
            which = rng.choice(("first", "second", "third", "last"))
            key = ("day", matching[-1] if which == "last" else matching[_ORDINALS.index(which)])
            instruction = rng.choice((f"Click the {which} {_DAY_NAMES[wd]} of {name}",
                                      f"Select the {which} {_DAY_NAMES[wd]} in {name}"))
        elif kind == "selected":
            selected = selected or rng.randint(1, days)
            key = ("day", selected)
            instruction = rng.choice(("Pick the highlighted date", "Click the selected date",
                                      "Click the date that is already selected"))
        elif kind == "nav":
            step = rng.choice((-1, 1))
            key = "next" if step == 1 else "prev"
            other = _MONTHS[(month - 1 + step) % 12]
            instruction = rng.choice(("Go to next month", "Show the next month", f"Show {other}") if step == 1
                                     else ("Go to the previous month", "Go back one month", f"Go back to {other}"))
        else:
            has_today, key = True, "today"
            instruction = rng.choice(("Jump to today", "Click the Today button", "Go to today's date"))

    spec = _Month(year, month, _calendar.Calendar(rng.choice((0, 6))).monthdatescalendar(year, month),
                  selected, has_today, generic == "blue", _accent(rng, generic != "blue"), rng.random() < 0.35)
    canvas = _draw_month_view(rng, w, h, spec) if rng.random() < 0.6 else _draw_date_picker(rng, w, h, spec)
    target = canvas.boxes[key]
    return _Scene(canvas.image, instruction, _click(target), target)


def _calendar_header(c: _Canvas, rng: random.Random, spec: _Month, box: Box, fg: RGB, button_fill: RGB,
                     title_size: int) -> None:
    """Month title at the left of ``box``; [Today] [<] [>] at its right."""
    x0, y0, x1, y1 = box
    cy = (y0 + y1) / 2
    c.text(x0, cy, f"{_MONTHS[spec.month - 1]} {spec.year}", title_size, fg)
    side = round((y1 - y0) * rng.uniform(0.62, 0.75))
    top = round(cy - side / 2)
    nxt = c.box((x1 - side, top, x1, top + side), button_fill, radius=4, key="next")
    prev = c.box((nxt[0] - 4 - side, top, nxt[0] - 4, top + side), button_fill, radius=4, key="prev")
    c.chevron(prev, -1, fg)
    c.chevron(nxt, 1, fg)
    if spec.has_today:
        size = max(10, round(side * 0.5))
        width = _text_width("Today", size) + 14
        fill, label = (BLUE, WHITE) if spec.blue_today else (button_fill, fg)
        c.button((prev[0] - 6 - width, top, prev[0] - 6, top + side), "Today", size, fill, label, key="today")


def _weekday_labels(weeks: list[list[datetime.date]], cell_w: int) -> list[str]:
    letters = 3 if cell_w >= 40 else 2 if cell_w >= 24 else 1
    return [_DAY_NAMES[d.weekday()][:letters] for d in weeks[0]]


def _draw_month_view(rng: random.Random, w: int, h: int, spec: _Month) -> _Canvas:
    """A full-window month grid under a coloured (or plain) header band."""
    bg = _jitter(rng, (32, 33, 36) if spec.dark else (252, 252, 253), 3)
    fg = (232, 234, 237) if spec.dark else (32, 33, 36)
    muted = _mix(bg, fg, 0.45)
    cell = _mix(bg, fg, 0.07)
    c = _Canvas(w, h, bg)
    margin = rng.randint(4, 10)

    band_h = round(h * rng.uniform(0.13, 0.17))
    if rng.random() < 0.6:
        band = spec.accent if rng.random() < 0.5 else _mix(spec.accent, BLACK, 0.35)
        c.box((0, 0, w - 1, band_h), band)
        header_fg, button_fill = WHITE, _mix(band, WHITE, 0.22)
    else:
        c.box((0, band_h - 1, w - 1, band_h), _mix(bg, fg, 0.2))
        header_fg, button_fill = fg, cell
    _calendar_header(c, rng, spec, (margin + 4, 0, w - 1 - margin, band_h), header_fg, button_fill,
                     max(12, round(band_h * 0.4)))

    gap = rng.choice((2, 3))
    week_h = round(h * rng.uniform(0.065, 0.08))
    top, bottom = band_h + week_h + 4, h - 1 - margin
    rows = len(spec.weeks)
    cell_w = (w - 2 * margin - 6 * gap) // 7
    cell_h = (bottom - top - (rows - 1) * gap) // rows
    for i, label in enumerate(_weekday_labels(spec.weeks, cell_w)):
        c.text(margin + i * (cell_w + gap) + cell_w / 2, band_h + 2 + week_h / 2, label,
               max(9, round(week_h * 0.55)), muted, "m")

    in_corner = cell_h >= 30 and rng.random() < 0.5
    size = max(10, min(15, round(cell_h * (0.34 if in_corner else 0.42))))
    show_neighbours = rng.random() < 0.5
    for r, week in enumerate(spec.weeks):
        for i, day in enumerate(week):
            x0, y0 = margin + i * (cell_w + gap), top + r * (cell_h + gap)
            box = (x0, y0, x0 + cell_w - 1, y0 + cell_h - 1)
            if day.month != spec.month:
                if show_neighbours:
                    c.box(box, _mix(bg, fg, 0.03), radius=3)
                    c.text(x0 + cell_w / 2, y0 + cell_h / 2, str(day.day), size, _mix(bg, fg, 0.3), "m")
                continue
            chosen = day.day == spec.selected
            c.box(box, spec.accent if chosen else cell, radius=3, key=("day", day.day))
            number = WHITE if chosen else fg
            if in_corner:
                c.text(x0 + 5, y0 + 4 + size / 2, str(day.day), size, number)
                if not chosen and rng.random() < 0.15:  # an event bar
                    c.box((x0 + 4, y0 + cell_h - 9, x0 + cell_w - 5, y0 + cell_h - 5),
                          _mix(spec.accent, cell, 0.45), radius=2)
            else:
                c.text(x0 + cell_w / 2, y0 + cell_h / 2, str(day.day), size, number, "m")
    return c


def _draw_date_picker(rng: random.Random, w: int, h: int, spec: _Month) -> _Canvas:
    """A form with a date field, and the date-picker popup opened under it."""
    page = _jitter(rng, (24, 24, 27) if spec.dark else (240, 242, 245), 4)
    card = (44, 45, 49) if spec.dark else WHITE
    fg = (232, 234, 237) if spec.dark else (30, 32, 36)
    muted = _mix(card, fg, 0.5)
    line = _mix(card, fg, 0.22)
    c = _Canvas(w, h, page)
    margin = rng.randint(8, 14)

    y = margin
    if h >= 290:
        c.text(margin, y + 8, rng.choice(("Book an appointment", "Travel details", "Schedule a visit",
                                          "Personal details")), 15, fg)
        y += 26
    label = rng.choice(("Date", "Start date", "Appointment date", "Check-in", "Date of birth"))
    c.text(margin, y + 5, label, 11, _mix(page, fg, 0.6))
    y += 13
    field_w = rng.randint(140, min(230, w - 2 * margin))
    field = c.box((margin, y, margin + field_w, y + 24), card, outline=line, radius=4)
    shown = (f"{spec.month:02d}/{spec.selected:02d}/{spec.year}" if spec.selected else "MM/DD/YYYY")
    c.text(field[0] + 8, y + 12, shown, 12, fg if spec.selected else muted)
    c.box((field[2] - 20, y + 6, field[2] - 8, y + 18), None, outline=muted, radius=2)  # calendar icon
    if w - field[2] > 120:  # a neighbouring field the popup partly covers
        c.text(field[2] + 12, y - 8, "Time", 11, _mix(page, fg, 0.6))
        c.box((field[2] + 12, y, w - 1 - margin, y + 24), card, outline=line, radius=4)
    y += 28

    px = margin + rng.randint(0, 12)
    pw = min(w - 1 - margin - px, rng.randint(220, 300))
    popup = (px, y, px + pw, h - 1 - margin)
    c.box((popup[0] + 2, popup[1] + 3, popup[2] + 2, popup[3] + 3), _mix(page, BLACK, 0.18), radius=8)  # shadow
    c.box(popup, card, outline=line, radius=8)

    pad = 8
    header = (px + pad + 2, y + pad, popup[2] - pad, y + pad + 24)
    _calendar_header(c, rng, spec, header, fg, _mix(card, fg, 0.08), 13)
    gap = 2
    cell_w = (pw - 2 * pad - 6 * gap) // 7
    week_y = header[3] + 9
    for i, label in enumerate(_weekday_labels(spec.weeks, cell_w)):
        c.text(px + pad + i * (cell_w + gap) + cell_w / 2, week_y, label, 10, muted, "m")
    top, bottom = week_y + 9, popup[3] - pad
    rows = len(spec.weeks)
    cell_h = (bottom - top - (rows - 1) * gap) // rows
    size = max(10, min(13, round(cell_h * 0.5)))
    cell = _mix(card, fg, 0.05)
    for r, week in enumerate(spec.weeks):
        for i, day in enumerate(week):
            x0, y0 = px + pad + i * (cell_w + gap), top + r * (cell_h + gap)
            if day.month != spec.month:
                c.text(x0 + cell_w / 2, y0 + cell_h / 2, str(day.day), size, _mix(card, fg, 0.3), "m")
                continue
            chosen = day.day == spec.selected
            c.box((x0, y0, x0 + cell_w - 1, y0 + cell_h - 1), spec.accent if chosen else cell,
                  radius=min(cell_w, cell_h) // 2, key=("day", day.day))
            c.text(x0 + cell_w / 2, y0 + cell_h / 2, str(day.day), size, WHITE if chosen else fg, "m")
    return c


# ---------------------------------------------------------------------- claim window

_CLAIM_FIELDS = ("Claim number", "Patient name", "Date of service", "Procedure code", "Diagnosis code",
                 "Amount", "Provider NPI")
_PLACEHOLDERS = {"Claim number": "", "Patient name": "Full name", "Date of service": "MM/DD/YYYY",
                 "Procedure code": "CPT", "Diagnosis code": "ICD-10", "Amount": "0.00", "Provider NPI": "10 digits"}
_TYPE_TEMPLATES = {
    "Claim number": ("Set the claim number to {v}", "Enter claim number {v}"),
    "Patient name": ("Enter the patient name {v}", "Type {v} in the patient name field"),
    "Date of service": ("Fill in the date of service: {v}", "Enter {v} as the date of service"),
    "Procedure code": ("Type procedure code {v}", "Enter {v} in the procedure code field"),
    "Diagnosis code": ("Type the diagnosis code {v}", "Enter diagnosis code {v}"),
    "Amount": ("Enter {v} in the amount field", "Type {v} into Amount", "Set the amount to {v}"),
    "Provider NPI": ("Enter provider NPI {v}", "Type {v} as the provider NPI"),
}
_DIAGNOSIS_CODES = ("J45.909", "E11.9", "I10", "M54.5", "K21.9", "R51.9", "Z00.00", "S93.401A", "J06.9",
                    "F41.1", "N39.0", "L30.9")
_BUTTON_TEMPLATES = {
    "Submit": ("Submit the claim", "Click Submit", "Send the claim for processing"),
    "Save draft": ("Save the claim as a draft", "Click Save draft"),
    "Cancel": ("Cancel this claim", "Click Cancel", "Close the claim without saving"),
}
_CLAIM_TYPES = ("Medical", "Dental", "Vision")
_INSURERS = ("Blue Harbor Health", "Summit Mutual", "Crescent Insurance", "Northwind Care", "Evergreen Assurance")
_TITLE_BARS: dict[str, RGB] = {"navy": (30, 58, 138), "slate": (51, 65, 85), "charcoal": (45, 45, 48),
                               "maroon": (127, 29, 29), "forest": (20, 83, 45)}
_DESKTOPS = ((96, 96, 104), (40, 44, 52), (118, 140, 110), (0, 120, 120), (58, 110, 165))  # last two bluish


def _claim_value(rng: random.Random, label: str) -> str:
    """A plausible entry for a claim field."""
    if label == "Claim number":
        return str(rng.randint(10000, 99999))
    if label == "Patient name":
        return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
    if label == "Date of service":
        return f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/{rng.randint(2022, 2026)}"
    if label == "Procedure code":
        return str(rng.choice((99213, 99214, 93000, 80053, 71046, 90834, 97110)))
    if label == "Diagnosis code":
        return rng.choice(_DIAGNOSIS_CODES)
    if label == "Amount":
        return f"{rng.randint(15, 4999)}.{rng.choice((0, 0, 50, 25, 99, rng.randint(1, 98))):02d}"
    return str(rng.randint(1_000_000_000, 1_999_999_999))  # Provider NPI


def _render_claim(rng: random.Random, w: int, h: int, generic: str | None) -> _Scene:
    blue_ok = generic != "blue"
    dark = rng.random() < 0.3
    accent = _accent(rng, blue_ok)
    claim_no = str(rng.randint(10000, 99999))

    inset = rng.choice((0, 0, rng.randint(4, 12)))
    title_h = round(h * rng.uniform(0.085, 0.11))
    menu = rng.random() < 0.3
    pad = rng.randint(8, 12)
    button_h = rng.randint(22, 26)
    radio = generic == "first" or rng.random() < 0.45
    body_top = inset + title_h + (16 if menu else 0)
    avail = (h - 1 - inset - pad - button_h - 10) - (body_top + pad)
    n_fields = min(rng.randint(3, 6), avail // 24 - radio)
    row_h = min(rng.randint(26, 34), avail // (n_fields + radio))
    field_h = max(18, row_h - rng.randint(4, 8))
    labels = [_CLAIM_FIELDS[i] for i in sorted(rng.sample(range(len(_CLAIM_FIELDS)), n_fields))]
    values: dict[str, str | None] = {
        lab: (claim_no if lab == "Claim number" else _claim_value(rng, lab))
        if rng.random() < (0.8 if lab == "Claim number" else 0.45) else None
        for lab in labels
    }
    buttons = [b for b in ("Submit", "Save draft", "Cancel") if b == "Submit" or rng.random() < 0.7]
    if rng.random() < 0.5:
        buttons.reverse()
    radio_on = rng.randrange(len(_CLAIM_TYPES))
    focused = rng.choice(labels) if rng.random() < 0.3 else None
    blue_button = None
    action_text = None  # what a type() action enters

    key: object
    if generic:
        instruction = rng.choice(_GENERIC[generic])
        if generic == "highlighted":
            focused = rng.choice(labels)
            key = ("field", focused)
        elif generic == "blue":
            blue_button = rng.choice(buttons)
            key = ("button", blue_button)
        else:
            key = ("radio", 0)
    else:
        kind = rng.choices(("type", "field", "button", "radio"), weights=(45, 10, 30, 15))[0]
        if kind == "radio" and not radio:
            kind = "button"
        if kind == "type":
            empty = [lab for lab in labels if values[lab] is None] or [rng.choice(labels)]
            label = rng.choice(empty)
            values[label] = None
            action_text = _claim_value(rng, label)
            key = ("field", label)
            instruction = rng.choice(_TYPE_TEMPLATES[label]).format(v=action_text)
        elif kind == "field":
            label = rng.choice(labels)
            key = ("field", label)
            instruction = rng.choice((f"Click the {label} field", f"Focus the {label} box"))
        elif kind == "button":
            button = rng.choice(buttons)
            key = ("button", button)
            instruction = rng.choice(_BUTTON_TEMPLATES[button])
        else:
            option = rng.choice([i for i in range(len(_CLAIM_TYPES)) if i != radio_on])
            key = ("radio", option)
            name = _CLAIM_TYPES[option]
            instruction = rng.choice((f"Choose {name} as the claim type", f"Mark this as a {name.lower()} claim",
                                      f"Select the {name} option"))

    # Window frame, title bar, optional menu bar.
    body = _jitter(rng, (45, 45, 48) if dark else (236, 236, 238), 4)
    fg = (230, 230, 230) if dark else (25, 25, 28)
    field_fill = (30, 30, 32) if dark else WHITE
    border = _mix(body, fg, 0.35)
    c = _Canvas(w, h, _jitter(rng, rng.choice(_DESKTOPS if blue_ok else _DESKTOPS[:3]), 8))
    win = c.box((inset, inset, w - 1 - inset, h - 1 - inset), body, outline=border)
    bar = _TITLE_BARS[rng.choice(tuple(_TITLE_BARS) if blue_ok else ("charcoal", "maroon", "forest"))]
    c.box((win[0], win[1], win[2], win[1] + title_h), bar)
    title = f"Claim #{claim_no}"
    title_size = max(11, round(title_h * 0.5))
    with_insurer = f"{title} - {rng.choice(_INSURERS)}"
    if _text_width(with_insurer, title_size) < w - 2 * inset - 90 and rng.random() < 0.6:
        title = with_insurer
    c.text(win[0] + 8, win[1] + title_h / 2, title, title_size, WHITE)
    ctl = max(10, title_h - 12)
    for i in range(3):  # close, maximise, minimise
        x1 = win[2] - 6 - i * (ctl + 6)
        cb = c.box((x1 - ctl, win[1] + title_h / 2 - ctl / 2, x1, win[1] + title_h / 2 + ctl / 2),
                   _mix(bar, WHITE, 0.15), radius=2)
        if i == 0:
            c.draw.line((cb[0] + 3, cb[1] + 3, cb[2] - 3, cb[3] - 3), fill=WHITE)
            c.draw.line((cb[0] + 3, cb[3] - 3, cb[2] - 3, cb[1] + 3), fill=WHITE)
        elif i == 1:
            c.draw.rectangle((cb[0] + 3, cb[1] + 3, cb[2] - 3, cb[3] - 3), outline=WHITE)
        else:
            c.draw.line((cb[0] + 3, cb[3] - 4, cb[2] - 3, cb[3] - 4), fill=WHITE)
    if menu:
        x = win[0] + 8
        for item in ("File", "Edit", "View", "Help"):
            c.text(x, win[1] + title_h + 8, item, 11, fg)
            x += _text_width(item, 11) + 14

    # Labelled fields, one per row, then the claim-type radio group.
    size = 12 if row_h >= 28 else 11
    label_w = max(_text_width(lab, size) for lab in labels + ["Claim type"]) + 12
    fx0 = win[0] + pad + label_w
    fx1 = min(win[2] - pad, fx0 + rng.randint(170, 270))
    highlight_fill = (92, 72, 20) if dark else (255, 246, 196)
    for i, label in enumerate(labels):
        cy = body_top + pad + i * row_h + row_h / 2
        c.text(win[0] + pad, cy, label, size, fg)
        box = (fx0, cy - field_h / 2, fx1, cy + field_h / 2)
        if label == focused:
            c.box(box, highlight_fill, outline=accent, width=2, radius=2, key=("field", label))
        else:
            c.box(box, field_fill, outline=border, radius=2, key=("field", label))
        value = values[label]
        shown, colour = (value, fg) if value else (_PLACEHOLDERS[label], _mix(field_fill, fg, 0.45))
        c.text(fx0 + 6, cy, shown, size, colour)
    if radio:
        cy = body_top + pad + n_fields * row_h + row_h / 2
        c.text(win[0] + pad, cy, "Claim type", size, fg)
        x = fx0
        for i, name in enumerate(_CLAIM_TYPES):
            dot = c.ellipse((x, cy - 6, x + 12, cy + 6), field_fill, border, key=("radio", i))
            if i == radio_on:
                c.draw.ellipse((dot[0] + 3, dot[1] + 3, dot[2] - 3, dot[3] - 3), fill=accent)
            c.text(x + 17, cy, name, size - 1, fg)
            x += 17 + _text_width(name, size - 1) + 14

    # Buttons, right-aligned along the bottom.
    x1, y1 = win[2] - pad, win[3] - pad
    bsize = 12 if button_h >= 24 else 11
    neutral = _mix(body, fg, 0.12)
    primary_filled = rng.random() < 0.7
    for label in reversed(buttons):
        bw = _text_width(label, bsize) + 24
        if blue_button:
            fill, text_fg, outline = (BLUE, WHITE, None) if label == blue_button else (neutral, fg, border)
        elif label == "Submit" and primary_filled:
            fill, text_fg, outline = accent, WHITE, None
        else:
            fill, text_fg, outline = neutral, fg, border
        c.button((x1 - bw, y1 - button_h, x1, y1), label, bsize, fill, text_fg, outline, radius=3,
                 key=("button", label))
        x1 -= bw + 8

    target = c.boxes[key]
    action = _type(action_text) if action_text is not None else _click(target)
    return _Scene(c.image, instruction, action, target)


# ------------------------------------------------------------------- provider select

_SPECIALTIES = (("Cardiology", "cardiologist"), ("Dermatology", "dermatologist"), ("Pediatrics", "pediatrician"),
                ("Neurology", "neurologist"), ("Orthopedics", "orthopedist"), ("Family medicine", "family doctor"),
                ("Oncology", "oncologist"), ("Psychiatry", "psychiatrist"))
_PROVIDER_TITLES = ("Find a provider", "Choose your doctor", "In-network providers", "Select a provider")


def _render_providers(rng: random.Random, w: int, h: int, generic: str | None) -> _Scene:
    blue_ok = generic != "blue"
    dark = rng.random() < 0.3
    accent = _accent(rng, blue_ok)
    margin = rng.randint(6, 12)
    bar_h = round(h * rng.uniform(0.1, 0.13))
    search_h = rng.randint(24, 28)
    list_top = bar_h + margin + search_h + margin
    avail = h - margin - list_top
    n = min(rng.randint(3, 5), avail // 44)
    row_gap = rng.choice((0, 6))
    row_h = min(rng.randint(44, 58), (avail - (n - 1) * row_gap) // n)

    specialties = rng.sample(_SPECIALTIES, rng.randint(2, 4))
    rows = [(rng.choice(specialties), first, last, dist / 10, rating / 10)
            for first, last, dist, rating in zip(rng.sample(_FIRST_NAMES, n), rng.sample(_LAST_NAMES, n),
                                                 rng.sample(range(3, 160), n), rng.sample(range(30, 51), n))]
    if rng.random() < 0.4:
        rows.sort(key=lambda row: row[3])
    query = rng.choice(("", "", rows[0][0][0].lower(), "near me", "in network"))
    highlighted = rng.randrange(n) if rng.random() < 0.25 else None
    blue_search = False

    key: object
    if generic:
        instruction = rng.choice(_GENERIC[generic])
        if generic == "highlighted":
            highlighted = rng.randrange(n)
            key = ("select", highlighted)
        elif generic == "blue":
            blue_search, key = True, "search"
        else:
            key = ("select", 0)
    else:
        kind = rng.choices(("name", "ordinal", "specialty", "closest", "rating", "search"),
                           weights=(40, 20, 15, 8, 10, 7))[0]
        if kind == "name":
            r = rng.randrange(n)
            _, first, last, _, _ = rows[r]
            instruction = rng.choice((f"Choose Dr. {last}", f"Select Dr. {first} {last}",
                                      f"Book an appointment with Dr. {last}", f"Pick {first} {last} from the list"))
        elif kind == "ordinal":
            r = rng.randrange(n)
            instruction = ("Choose the last provider in the list" if r == n - 1 and rng.random() < 0.5 else
                           rng.choice((f"Pick the {_ORDINALS[r]} provider",
                                       f"Select the {_ORDINALS[r]} doctor in the list")))
        elif kind == "specialty":
            spec = rng.choice(sorted({row[0] for row in rows}))
            r = min((i for i in range(n) if rows[i][0] == spec), key=lambda i: rows[i][3])
            instruction = rng.choice((f"Select the closest {spec[1]}", f"Choose the nearest {spec[1]}"))
        elif kind == "closest":
            r = min(range(n), key=lambda i: rows[i][3])
            instruction = rng.choice(("Select the closest provider", "Pick the nearest doctor"))
        elif kind == "rating":
            r = max(range(n), key=lambda i: rows[i][4])
            instruction = rng.choice(("Choose the highest-rated provider", "Pick the doctor with the best rating"))
        else:
            r = -1
            instruction = rng.choice(("Click the Search button", "Run the search"))
        key = "search" if r < 0 else ("select", r)

    bg = _jitter(rng, (17, 24, 39) if dark else (246, 248, 251), 4)
    surface = (31, 41, 55) if dark else WHITE
    fg = (240, 242, 245) if dark else (17, 24, 39)
    muted = _mix(surface, fg, 0.55)
    line = _mix(surface, fg, 0.15)
    c = _Canvas(w, h, bg)

    bar = accent if rng.random() < 0.6 else ((51, 65, 85) if blue_ok else (64, 64, 64))
    c.box((0, 0, w - 1, bar_h), bar)
    c.text(margin + 2, bar_h / 2, rng.choice(_PROVIDER_TITLES), max(12, round(bar_h * 0.42)), WHITE)

    sy = bar_h + margin
    search_w = _text_width("Search", 12) + 22
    field = c.box((margin, sy, w - 1 - margin - search_w - 6, sy + search_h), surface, outline=line,
                  radius=rng.choice((4, search_h // 2)))
    c.draw.ellipse((field[0] + 9, sy + search_h / 2 - 5, field[0] + 17, sy + search_h / 2 + 3), outline=muted,
                   width=2)
    c.draw.line((field[0] + 16, sy + search_h / 2 + 2, field[0] + 20, sy + search_h / 2 + 6), fill=muted, width=2)
    c.text(field[0] + 26, sy + search_h / 2, query or "Search by name or specialty", 12, fg if query else muted)
    search_fill = BLUE if blue_search else (accent if rng.random() < 0.5 else _mix(surface, fg, 0.35))
    c.button((w - 1 - margin - search_w, sy, w - 1 - margin, sy + search_h), "Search", 12, search_fill, WHITE,
             radius=4, key="search")

    select_label = rng.choice(("Select", "Select", "Choose", "Book"))
    select_w = _text_width(select_label, 12) + 22
    select_h = min(26, row_h - 14)
    filled = rng.random() < 0.6
    three_lines = row_h >= 50
    avatar_d = min(36, row_h - 14)
    for r, ((specialty, _), first, last, dist, rating) in enumerate(rows):
        y0 = list_top + r * (row_h + row_gap)
        row = (margin, y0, w - 1 - margin, y0 + row_h - 1)
        fill = _mix(surface, accent, 0.16) if r == highlighted else surface
        if row_gap:
            c.box(row, fill, outline=line, radius=6)
        else:
            c.box(row, fill)
            if r < n - 1:
                c.box((row[0], row[3], row[2], row[3]), line)
        if r == highlighted:
            c.box((row[0], row[1] + 2, row[0] + 3, row[3] - 2), accent)
        cy = y0 + row_h / 2
        ax = row[0] + 10
        avatar = _jitter(rng, rng.choice(_ICON_COLOURS), 20)
        c.ellipse((ax, cy - avatar_d / 2, ax + avatar_d, cy + avatar_d / 2), avatar)
        c.text(ax + avatar_d / 2, cy, first[0] + last[0], max(10, avatar_d // 3), WHITE, "m")
        tx = ax + avatar_d + 10
        lines = (cy - row_h * 0.27, cy, cy + row_h * 0.27) if three_lines else (cy - row_h * 0.18, cy + row_h * 0.2)
        c.text(tx, lines[0], f"Dr. {first} {last}", 13, fg)
        detail = f"{specialty} · {dist:.1f} mi"
        c.text(tx, lines[1], detail, 11, muted)
        gold = (245, 158, 11)
        if three_lines:  # five stars and the score
            for s in range(5):
                c.star(tx + 5 + s * 11, lines[2], 5, gold if s < round(rating) else line)
            c.text(tx + 60, lines[2], f"{rating:.1f}", 11, muted)
        else:  # one star and the score, after the detail
            sx = tx + _text_width(detail, 11) + 12
            c.star(sx, lines[1], 5, gold)
            c.text(sx + 8, lines[1], f"{rating:.1f}", 11, muted)
        bx1 = row[2] - 10
        sel = (bx1 - select_w, cy - select_h / 2, bx1, cy + select_h / 2)
        if filled:
            c.button(sel, select_label, 12, accent, WHITE, radius=4, key=("select", r))
        else:
            c.button(sel, select_label, 12, fill, accent, outline=accent, radius=4, key=("select", r))

    target = c.boxes[key]
    return _Scene(c.image, instruction, _click(target), target)


# ------------------------------------------------------------------ settings toggles

_SETTINGS = ("Wi-Fi", "Bluetooth", "Dark mode", "Notifications", "Location", "Airplane mode", "Auto-brightness",
             "Do not disturb", "Mobile data", "Battery saver", "Auto-rotate", "NFC", "Night light",
             "Vibrate on ring", "Background sync", "Haptic feedback", "Read receipts", "Email alerts")
_PROPER = {"Wi-Fi", "Bluetooth", "NFC"}  # keep their capitals inside a sentence
_SETTINGS_PAGES = ("Settings", "Quick settings", "Connections", "Display & sound", "Privacy", "Preferences")
_SECTIONS = ("GENERAL", "CONNECTIVITY", "DISPLAY", "ALERTS", "SYSTEM", "PRIVACY")


def _render_settings(rng: random.Random, w: int, h: int, generic: str | None) -> _Scene:
    blue_ok = generic != "blue"
    dark = rng.random() < 0.4
    accent = _accent(rng, blue_ok)
    on_fill = (52, 199, 89) if rng.random() < 0.5 else accent
    margin = rng.randint(8, 14)
    header_h = rng.randint(30, 38)
    done_label = rng.choice(("Done", "Done", "Save", "Apply"))
    has_done = rng.random() < 0.4
    groups = rng.choice((1, 2))
    caption_h = 18
    avail = h - header_h - margin - groups * caption_h - (groups - 1) * 6
    n = min(rng.randint(4, 8), avail // 28)
    row_h = min(rng.randint(30, 40), avail // n)
    labels = rng.sample(_SETTINGS, n)
    states = [rng.random() < 0.5 for _ in range(n)]
    highlighted = rng.randrange(n) if rng.random() < 0.2 else None
    blue_done = False

    key: object
    if generic:
        instruction = rng.choice(_GENERIC[generic])
        if generic == "highlighted":
            highlighted = rng.randrange(n)
            key = ("switch", highlighted)
        elif generic == "blue":
            has_done = blue_done = True
            key = "done"
        else:
            key = ("switch", 0)
    else:
        kind = rng.choices(("set", "toggle", "ordinal", "done"), weights=(65, 15, 10, 10))[0]
        r = rng.randrange(n)
        spoken = labels[r] if labels[r] in _PROPER else labels[r].lower()
        key = ("switch", r)
        if kind == "set" and states[r]:
            instruction = rng.choice((f"Turn off {spoken}", f"Disable {spoken}", f"Switch {spoken} off"))
        elif kind == "set":
            instruction = rng.choice((f"Turn on {spoken}", f"Enable {spoken}", f"Switch {spoken} on",
                                      f"Activate {spoken}"))
        elif kind == "toggle":
            instruction = f"Toggle {spoken}"
        elif kind == "ordinal":
            instruction = rng.choice((f"Toggle the {_ORDINALS[r]} setting", f"Flip the {_ORDINALS[r]} switch"))
        else:
            has_done, key = True, "done"
            instruction = rng.choice((f"Tap {done_label}", f"Click {done_label} to close the settings"))

    bg = _jitter(rng, (8, 8, 10) if dark else (242, 242, 247), 4)
    surface = (30, 30, 33) if dark else WHITE
    fg = (242, 242, 245) if dark else (20, 20, 24)
    muted = (142, 142, 147)
    separator = _mix(surface, fg, 0.14)
    off_fill = _mix(surface, fg, 0.18)
    knob = (250, 250, 250)
    c = _Canvas(w, h, bg)

    # Header: back chevron, page title, optional Done button.
    c.chevron((margin, 0, margin + 14, header_h), -1, accent if rng.random() < 0.5 else fg)
    title = rng.choice(_SETTINGS_PAGES)
    if rng.random() < 0.5:
        c.text(w / 2, header_h / 2, title, 15, fg, "m")
    else:
        c.text(margin + 22, header_h / 2, title, 15, fg)
    c.box((0, header_h - 1, w - 1, header_h - 1), _mix(bg, fg, 0.12))
    if has_done:
        bw = _text_width(done_label, 12) + 20
        fill = BLUE if blue_done else (accent if rng.random() < 0.5 else _mix(bg, fg, 0.45))
        c.button((w - 1 - margin - bw, header_h / 2 - 11, w - 1 - margin, header_h / 2 + 11), done_label, 12,
                 fill, WHITE, radius=11 if rng.random() < 0.5 else 4, key="done")

    icons = rng.random() < 0.5
    radius = rng.choice((0, 8, 10))
    switch_w = rng.randint(34, 44)
    switch_h = round(switch_w * 0.56)
    split = n if groups == 1 else rng.randint(1, n - 1)
    sections = rng.sample(_SECTIONS, groups)
    y = header_h
    for g, (start, stop) in enumerate(((0, split), (split, n))[:groups]):
        c.text(margin + 6, y + caption_h / 2 + 2, sections[g], 10, muted)
        y += caption_h
        c.box((margin, y, w - 1 - margin, y + (stop - start) * row_h - 1), surface, radius=radius)
        for r in range(start, stop):
            cy = y + row_h / 2
            if r == highlighted:
                c.box((margin + 3, y + 2, w - 1 - margin - 3, y + row_h - 3), _mix(surface, accent, 0.2), radius=6)
            tx = margin + 12
            if icons:
                c.box((tx, cy - 9, tx + 18, cy + 9), rng.choice(_ICON_COLOURS), radius=4)
                c.text(tx + 9, cy, labels[r][0], 10, WHITE, "m")
                tx += 28
            c.text(tx, cy, labels[r], 13, fg)
            x1 = w - 1 - margin - 12
            c.switch((x1 - switch_w, cy - switch_h / 2, x1, cy + switch_h / 2), states[r], on_fill, off_fill, knob,
                     key=("switch", r))
            if r < stop - 1:
                c.box((tx, y + row_h - 1, w - 1 - margin, y + row_h - 1), separator)
            y += row_h
        y += 6

    target = c.boxes[key]
    return _Scene(c.image, instruction, _click(target), target)


# ----------------------------------------------------------------------- public API

_RENDERERS: dict[str, Callable[[random.Random, int, int, str | None], _Scene]] = {
    "calendar": _render_calendar,
    "claim-window": _render_claim,
    "provider-select": _render_providers,
    "settings-toggle": _render_settings,
}


def _check_task(task: str) -> None:
    if task not in _RENDERERS:
        raise InputError(located(None, "task", f"unknown demo task {task!r}", fix=f"use one of {', '.join(TASKS)}"))


def render_sample(task: str, rng: random.Random, idx: int) -> Sample:
    """Draw one screenshot of ``task`` with its instruction and action; ``idx`` names it ``<task>-<idx:06d>``.

    All randomness comes from ``rng``. The image is 320x240 to 480x360 pixels.
    """
    _check_task(task)
    w = rng.randint(320, 480)
    h = min(360, max(240, round(w * rng.uniform(0.62, 0.82))))
    generic = rng.choice(tuple(_GENERIC)) if rng.random() < GENERIC_RATE else None
    scene = _RENDERERS[task](rng, w, h, generic)
    return Sample(f"{task}-{idx:06d}", task, scene.image, scene.instruction, scene.action, scene.target)


def _sample_rng(split: str, task: str, seed: int, idx: int) -> random.Random:
    """One generator per sample, so sample ``idx`` does not depend on how many are written."""
    return random.Random(f"{split}:{task}:{seed}:{idx}")


def write_dataset(task: str, out_dir: str | Path, n: int, seed: int = 0) -> Path:
    """Render ``n`` samples of ``task``: ``out_dir/images/<id>.png`` and ``out_dir/train.jsonl``.

    Each JSONL line is the seed's adapter-dataset record (``id``, ``image`` relative to
    the JSONL's folder, a human/gpt ``conversations`` pair, ``metadata``). Returns the
    JSONL path.
    """
    _check_task(task)
    if n < 1:
        raise InputError(located(None, "n", f"must be at least 1, got {n}", fix="ask for one screenshot or more"))
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    partial = path.with_name(path.name + ".tmp")
    with partial.open("w", encoding="utf-8") as f:
        for idx in range(n):
            sample = render_sample(task, _sample_rng("train", task, seed, idx), idx)
            sample.image.save(images / f"{sample.id}.png", format="PNG")
            record = {
                "id": sample.id,
                "image": f"images/{sample.id}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{sample.instruction}"},
                    {"from": "gpt", "value": sample.action},
                ],
                "metadata": {"task": task, "seed": seed, "width": sample.image.width, "height": sample.image.height},
            }
            f.write(json.dumps(record) + "\n")
    os.replace(partial, path)
    return path


def write_heldout(out_dir: str | Path, n_per_task: int, seed: int) -> list[dict]:
    """Render ``n_per_task`` held-out samples of every task into ``out_dir/images``.

    Drawn from a different stream than :func:`write_dataset` with the same seed. Returns
    ``[{"image": path, "prompt": instruction, "task": task, "action": action}, ...]``,
    task by task in :data:`TASKS` order.
    """
    if n_per_task < 1:
        raise InputError(located(None, "n_per_task", f"must be at least 1, got {n_per_task}",
                                 fix="ask for one screenshot per task or more"))
    images = Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in TASKS:
        for idx in range(n_per_task):
            sample = render_sample(task, _sample_rng("heldout", task, seed, idx), idx)
            path = images / f"{sample.id}.png"
            sample.image.save(path, format="PNG")
            rows.append({"image": str(path), "prompt": sample.instruction, "task": task, "action": sample.action})
    return rows
